//! Send-side bandwidth estimation for one subscriber transport, from transport-wide congestion
//! control feedback (draft-holmer-rmcat-transport-wide-cc-extensions-01), in the manner of Google
//! Congestion Control (draft-ietf-rmcat-gcc-02).
//!
//! Why: the edge decides per subscriber which simulcast layers fit its downlink. The subscriber's
//! browser reports, for every packet carrying the transport-wide sequence number, whether and when
//! it arrived; from that we estimate how much the path carries.
//!
//! How:
//! - Delay-based (GCC §5): received packets are grouped by send time into bursts of 5 ms
//!   ([`BURST_TIME`]); the variation of the inter-group delay is accumulated, smoothed and fed to a
//!   trendline filter (a least-squares slope over the last [`TRENDLINE_WINDOW`] groups, as
//!   libwebrtc does instead of the draft's Kalman filter); an over-use detector compares the
//!   trend with an adaptive threshold (GCC §5.4); an AIMD rate controller (GCC §5.5) turns
//!   over-use into a decrease to 0.85 × the measured receive rate and normal operation into an
//!   increase: multiplicative (8 %/s) far from the last congestion point, additive (about one
//!   packet per response time) near it.
//! - Loss-based (GCC §6): over each loss interval, more than 10 % loss decreases the estimate by
//!   half the loss fraction, less than 2 % lets it grow by 8 %/s; the delay-based estimate caps it.
//!
//! - Growth is capped as in GCC (§5.5): the estimate rises to at most 1.5 × the acked rate (plus
//!   10 kbit/s), so it stays near what the path has been shown to carry. An SFU's send rate is
//!   set by what publishers send, not by the estimate (it is application-limited), so this cap
//!   alone would hold a subscriber on a low layer forever.
//! - Probing: to learn whether a higher layer fits, the sender asks for a probe cluster
//!   ([`SendSideBwe::start_probe`]): for [`PROBE_DURATION`] it tops its media up with redundant
//!   packets ([`SendSideBwe::probe_bytes_due`]) to the cluster's goal rate. When the cluster's
//!   feedback is in, the rate the receiver saw is compared with the rate sent (libwebrtc's probe
//!   bitrate estimator): a receive rate under 90 % of the send rate (or loss) means the probe
//!   saturated the path; otherwise the path carried it and the estimate rises to the measured
//!   rate. Unlike libwebrtc, a saturated probe never raises the estimate: behind a token bucket
//!   (a `tbf` burst, a policer's depth) part of the cluster passes at line rate, so what got
//!   through overstates the path's rate; and the first third of a cluster is left out of the
//!   rates for the same reason. Only probes raise the estimate above the cap, so an upgrade is
//!   decided on evidence, not tried on the subscriber's link.
//!
//! How to drive it: [`SendSideBwe::handle_sent`] for each packet sent with the transport-wide
//! sequence number extension, [`SendSideBwe::handle_feedback`] with each parsed feedback message,
//! [`SendSideBwe::estimate`] when allocating layers. To probe: [`SendSideBwe::start_probe`], then
//! on every tick send [`SendSideBwe::probe_bytes_due`] bytes of redundant packets (they go through
//! `handle_sent` like media), and read the verdict from [`SendSideBwe::poll_probe_result`].
//!
//! Time model: sans-IO; `now` is passed in, never read. Arrival times come in the receiver's own
//! clock (any epoch): only their differences are used.
//!
//! Invariants: the estimate always lies in `[min, max]`; feedback about unknown, too old or
//! already reported packets is ignored, never an error.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::units::Bitrate;

/// Tuning of a [`SendSideBwe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BweConfig {
    /// Estimate before any feedback. Default 1 Mbit/s: enough for a medium layer plus audio,
    /// little enough that most downlinks carry it.
    pub initial: Bitrate,
    /// Floor of the estimate. Default 50 kbit/s: audio plus the lowest video layer's worth of
    /// keyframes still get through, and the estimate can recover.
    pub min: Bitrate,
    /// Ceiling of the estimate. Default 10 Mbit/s: above every layer set we forward to one
    /// subscriber.
    pub max: Bitrate,
}

impl Default for BweConfig {
    fn default() -> Self {
        Self {
            initial: Bitrate::kbps(1000),
            min: Bitrate::kbps(50),
            max: Bitrate::kbps(10_000),
        }
    }
}

/// One packet's entry in a transport-wide-cc feedback message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TwccPacketStatus {
    /// Transport-wide sequence number.
    pub seq: u16,
    /// Arrival time relative to an arbitrary receiver epoch (reference time × 64 ms plus the
    /// receive deltas), `None` if not received.
    pub arrival: Option<Duration>,
}

/// Packets sent within this time of a group's first packet form one group (GCC §5.2): a burst
/// the pacer or the encoder sends at once tells nothing about queueing inside it.
pub const BURST_TIME: Duration = Duration::from_millis(5);

/// How long a probe cluster tops the media up to its goal rate. Long enough that a token
/// bucket's burst (16 KB in a typical `tbf`) is a minor part of the cluster, short enough that a
/// probe a bottleneck cannot carry only fills its queue, without loss.
pub const PROBE_DURATION: Duration = Duration::from_millis(200);
/// A cluster's verdict waits at most this long after its last packet for feedback.
const PROBE_FEEDBACK_TIMEOUT: Duration = Duration::from_secs(1);
/// Received packets needed in the measured part of a cluster for a verdict.
const PROBE_MIN_PACKETS: usize = 5;
/// A receive rate below this fraction of the send rate: the probe saturated the path.
const PROBE_SATURATED_RATIO: f64 = 0.9;
/// Of a saturated probe's receive rate, this much is reported as what the path carried
/// (libwebrtc's value; informational, see the module docs).
const PROBE_SATURATED_USE: f64 = 0.95;
/// Loss in the measured part of a cluster above this also means saturation.
const PROBE_MAX_LOSS: f64 = 0.1;
/// A probe that measured this fraction of its goal succeeded.
const PROBE_SUCCESS_RATIO: f64 = 0.85;
/// GCC §5.5: the delay-based estimate grows to at most this factor of the acked rate...
const ACKED_CAP_FACTOR: f64 = 1.5;
/// ...plus this, so that a nearly idle transport can still grow a little.
const ACKED_CAP_EXTRA_BPS: f64 = 10_000.0;

/// Groups in the trendline's regression window; libwebrtc's default, about 100 ms of groups at
/// full rate, long enough to average out jitter, short enough to react within a few hundred ms.
pub const TRENDLINE_WINDOW: usize = 20;

/// Smoothing of the accumulated delay before the regression (libwebrtc's value).
const TRENDLINE_SMOOTHING: f64 = 0.9;
/// Gain applied to the slope: the trend is compared with thresholds in milliseconds.
const TRENDLINE_GAIN: f64 = 4.0;
/// The slope is multiplied by the number of deltas seen, up to this count, so that the first
/// few (noisy) groups cannot signal over-use.
const TRENDLINE_MAX_DELTAS: f64 = 60.0;

/// Adaptive threshold (GCC §5.4): initial value and bounds, in ms of modified trend.
const THRESHOLD_INITIAL: f64 = 12.5;
const THRESHOLD_MIN: f64 = 6.0;
const THRESHOLD_MAX: f64 = 600.0;
/// Threshold gains towards |trend| when below it (k_down) and above it (k_up), per ms. The
/// values go with the trendline's scaling (libwebrtc's), not the draft's Kalman filter.
const THRESHOLD_K_DOWN: f64 = 0.039;
const THRESHOLD_K_UP: f64 = 0.0087;
/// Trend samples this far above the threshold are outliers (sudden route change) and do not
/// move it.
const THRESHOLD_MAX_ADAPT_OFFSET: f64 = 15.0;
/// Over-use must last this long (ms of send time) before it is signalled.
const OVERUSE_TIME_MS: f64 = 10.0;

/// Multiplicative decrease factor on over-use (GCC §5.5: beta = 0.85).
const BETA: f64 = 0.85;
/// Multiplicative increase per second (GCC §5.5: eta = 1.08).
const ETA_PER_SEC: f64 = 1.08;
/// Nominal packet size for the additive increase (GCC §5.5: one packet per response time).
const ADDITIVE_PACKET_BITS: f64 = 1200.0 * 8.0;
/// Response time added to the RTT for the additive increase (GCC §5.5: RTT + 100 ms).
const RESPONSE_TIME_EXTRA: Duration = Duration::from_millis(100);
/// Growth steps are computed over at most this much elapsed time, so a long gap between
/// feedbacks does not yield one huge jump.
const MAX_INCREASE_STEP: Duration = Duration::from_secs(1);

/// Loss above this decreases the estimate (GCC §6).
const LOSS_HIGH: f64 = 0.10;
/// Loss below this lets the estimate grow (GCC §6).
const LOSS_LOW: f64 = 0.02;
/// A loss interval closes after this many reported packets and this much time: fewer packets
/// give a meaningless fraction.
const LOSS_INTERVAL_PACKETS: u32 = 20;
const LOSS_INTERVAL_TIME: Duration = Duration::from_millis(200);
/// A loss-based decrease needs this long plus an RTT since the previous one, so its effect can
/// show (libwebrtc's value).
const LOSS_DECREASE_INTERVAL: Duration = Duration::from_millis(300);

/// Window of the receive (acked) and send rate measurements.
const RATE_WINDOW: Duration = Duration::from_millis(500);
/// Minimum span a rate measurement divides by, so that two packets close together do not read
/// as an enormous rate.
const RATE_MIN_SPAN: Duration = Duration::from_millis(100);

/// An inter-group delay variation beyond this (ms) is a receiver clock jump or a path change,
/// not queueing: the delay detector starts afresh (libwebrtc's value).
const ARRIVAL_JUMP_MS: f64 = 3000.0;
/// Sending without any feedback for this long means the path (or the feedback path) is gone:
/// the estimate is cut by [`FEEDBACK_TIMEOUT_FACTOR`] once per timeout. Browsers send feedback
/// every 50-100 ms, so a second is many missed reports.
const FEEDBACK_TIMEOUT: Duration = Duration::from_secs(1);
const FEEDBACK_TIMEOUT_FACTOR: f64 = 0.8;

/// Sent packets older than this cannot get useful feedback any more.
const HISTORY_AGE: Duration = Duration::from_secs(2);
/// Hard bound of the sent-packet history (2 s at 10 Mbit/s of 1200-byte packets is ~2100).
const HISTORY_MAX: usize = 8192;
/// Every how many sent packets the history and the sent-rate window drop what has aged out
/// (each keeps at most this many packets past its age until then; the size cap holds always).
const HOUSEKEEPING_EVERY: u64 = 32;
/// RTT samples kept for the min filter.
const RTT_SAMPLES: usize = 16;

/// A packet we sent, awaiting feedback.
#[derive(Debug, Clone, Copy)]
struct SentPacket {
    send_time: Instant,
    size: usize,
    /// Counted in a loss interval already (reported as lost or received).
    counted: bool,
    /// Its arrival has been used already.
    acked: bool,
    /// Arrival (receiver clock, ms), once reported.
    arrival_ms: Option<f64>,
    /// The probe cluster it was sent in.
    probe: Option<u32>,
}

/// Sent packets by unwrapped transport-wide sequence number, in a ring: the sequence numbers
/// are ours and consecutive, so slot `seq - first` holds packet `seq` (a gap, from a packet
/// that was numbered but not sent, is an empty slot). Insertion, lookup and pruning are O(1)
/// without the per-node allocation of the `BTreeMap` it replaces (4% of the edge's profile).
#[derive(Debug, Clone, Default)]
struct SentHistory {
    first: u64,
    slots: VecDeque<Option<SentPacket>>,
}

impl SentHistory {
    fn insert(&mut self, seq: u64, packet: SentPacket) {
        let end = self.first + self.slots.len() as u64;
        if self.slots.is_empty() || seq >= end + HISTORY_MAX as u64 {
            // First packet, or a jump past everything kept: start afresh.
            self.slots.clear();
            self.first = seq;
        } else if seq < self.first {
            // Older than the history (numbered long ago, sent late): no feedback can use it.
            return;
        }
        let at = (seq - self.first) as usize;
        if at == self.slots.len() {
            // The usual case: the next sequence number.
            self.slots.push_back(Some(packet));
            return;
        }
        if at > self.slots.len() {
            self.slots.resize(at + 1, None);
        }
        self.slots[at] = Some(packet);
    }

    fn get_mut(&mut self, seq: u64) -> Option<&mut SentPacket> {
        let at = usize::try_from(seq.checked_sub(self.first)?).ok()?;
        self.slots.get_mut(at)?.as_mut()
    }

    /// Packets `first..=last` that were sent.
    fn range(&self, first: u64, last: u64) -> impl Iterator<Item = &SentPacket> + '_ {
        let from = first
            .saturating_sub(self.first)
            .min(self.slots.len() as u64) as usize;
        let to = (last.saturating_add(1))
            .saturating_sub(self.first)
            .min(self.slots.len() as u64) as usize;
        self.slots
            .range(from..to.max(from))
            .filter_map(|p| p.as_ref())
    }

    fn len(&self) -> usize {
        self.slots.len()
    }

    /// The oldest slot: `None` for an empty history, `Some(None)` for a gap.
    fn front(&self) -> Option<Option<&SentPacket>> {
        self.slots.front().map(|p| p.as_ref())
    }

    fn pop_front(&mut self) {
        if self.slots.pop_front().is_some() {
            self.first += 1;
        }
    }
}

/// A probe cluster: every packet sent while it runs belongs to it.
#[derive(Debug, Clone, Copy)]
struct ProbeCluster {
    id: u32,
    goal_bps: f64,
    start: Instant,
    bytes: usize,
    /// Unwrapped transport-wide sequence numbers of its first and last packet.
    seqs: Option<(u64, u64)>,
}

/// The verdict on one probe cluster.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbeResult {
    /// The id [`SendSideBwe::start_probe`] returned.
    pub id: u32,
    /// The rate the cluster was sent at.
    pub goal: Bitrate,
    /// What the path carried, `None` when too little of the cluster was reported to tell.
    pub measured: Option<Bitrate>,
    /// The path carried (nearly) the goal unsaturated; the estimate has risen to the measured
    /// rate.
    pub success: bool,
}

/// A packet group (GCC §5.2): send and arrival times in ms.
#[derive(Debug, Clone, Copy)]
struct Group {
    first_send: f64,
    last_send: f64,
    last_arrival: f64,
}

/// Groups packets and yields the deltas between consecutive groups.
#[derive(Debug, Clone, Default)]
struct InterArrival {
    current: Option<Group>,
    previous: Option<Group>,
}

/// The deltas between two consecutive groups, in ms.
#[derive(Debug, Clone, Copy)]
struct GroupDelta {
    send_delta: f64,
    arrival_delta: f64,
    arrival: f64,
}

impl InterArrival {
    fn add(&mut self, send: f64, arrival: f64) -> Option<GroupDelta> {
        let burst = BURST_TIME.as_secs_f64() * 1000.0;
        let Some(cur) = self.current.as_mut() else {
            self.current = Some(Group {
                first_send: send,
                last_send: send,
                last_arrival: arrival,
            });
            return None;
        };
        if send < cur.first_send {
            // Reordered behind a group already started: its timing is no longer comparable.
            return None;
        }
        let in_burst = send - cur.first_send <= burst;
        // GCC §5.2: a packet arriving within the burst time of the group's last packet, with
        // less delay than it, was queued behind it and belongs to the same burst.
        let arrival_delta = arrival - cur.last_arrival;
        let catches_up = arrival_delta <= burst && arrival_delta - (send - cur.last_send) < 0.0;
        if in_burst || catches_up {
            cur.last_send = cur.last_send.max(send);
            cur.last_arrival = cur.last_arrival.max(arrival);
            return None;
        }
        let finished = *cur;
        *cur = Group {
            first_send: send,
            last_send: send,
            last_arrival: arrival,
        };
        let previous = self.previous.replace(finished)?;
        let delta = GroupDelta {
            send_delta: finished.last_send - previous.last_send,
            arrival_delta: finished.last_arrival - previous.last_arrival,
            arrival: finished.last_arrival,
        };
        // Arrival order reversed between groups: reordering, not queueing.
        (delta.arrival_delta >= 0.0).then_some(delta)
    }
}

/// Over-use signal (GCC §5.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Usage {
    Normal,
    Over,
    Under,
}

/// Trendline filter plus adaptive-threshold over-use detector.
#[derive(Debug, Clone)]
struct DelayDetector {
    /// (arrival ms since the first group, smoothed accumulated delay ms).
    window: VecDeque<(f64, f64)>,
    first_arrival: Option<f64>,
    accumulated: f64,
    smoothed: f64,
    deltas: f64,
    trend: f64,
    prev_trend: f64,
    threshold: f64,
    last_threshold_update: Option<f64>,
    /// Time (ms) the trend has been above the threshold, negative when not.
    overuse_time: f64,
    overuse_count: u32,
    usage: Usage,
}

impl DelayDetector {
    fn new() -> Self {
        Self {
            window: VecDeque::with_capacity(TRENDLINE_WINDOW + 1),
            first_arrival: None,
            accumulated: 0.0,
            smoothed: 0.0,
            deltas: 0.0,
            trend: 0.0,
            prev_trend: 0.0,
            threshold: THRESHOLD_INITIAL,
            last_threshold_update: None,
            overuse_time: -1.0,
            overuse_count: 0,
            usage: Usage::Normal,
        }
    }

    fn update(&mut self, d: GroupDelta) {
        self.deltas = (self.deltas + 1.0).min(1000.0);
        self.accumulated += d.arrival_delta - d.send_delta;
        self.smoothed =
            TRENDLINE_SMOOTHING * self.smoothed + (1.0 - TRENDLINE_SMOOTHING) * self.accumulated;
        let first = *self.first_arrival.get_or_insert(d.arrival);
        self.window.push_back((d.arrival - first, self.smoothed));
        if self.window.len() > TRENDLINE_WINDOW {
            self.window.pop_front();
        }
        if self.window.len() == TRENDLINE_WINDOW {
            if let Some(slope) = linear_fit_slope(&self.window) {
                self.trend = slope;
            }
        }
        let modified = self.deltas.min(TRENDLINE_MAX_DELTAS) * self.trend * TRENDLINE_GAIN;
        self.detect(modified, d.send_delta, d.arrival);
    }

    /// GCC §5.4 over-use detector on the modified trend `m`.
    fn detect(&mut self, m: f64, send_delta: f64, now_ms: f64) {
        if m > self.threshold {
            if self.overuse_time < 0.0 {
                self.overuse_time = send_delta / 2.0;
            } else {
                self.overuse_time += send_delta;
            }
            self.overuse_count += 1;
            if self.overuse_time > OVERUSE_TIME_MS
                && self.overuse_count > 1
                && self.trend >= self.prev_trend
            {
                self.overuse_time = 0.0;
                self.overuse_count = 0;
                self.usage = Usage::Over;
            }
        } else if m < -self.threshold {
            self.overuse_time = -1.0;
            self.overuse_count = 0;
            self.usage = Usage::Under;
        } else {
            self.overuse_time = -1.0;
            self.overuse_count = 0;
            self.usage = Usage::Normal;
        }
        self.prev_trend = self.trend;
        self.adapt_threshold(m, now_ms);
    }

    /// GCC §5.4 adaptive threshold: follows |m| slowly upwards, faster downwards, so that
    /// competing TCP flows (which keep the queue at some level) do not starve us.
    fn adapt_threshold(&mut self, m: f64, now_ms: f64) {
        let last = *self.last_threshold_update.get_or_insert(now_ms);
        if m.abs() > self.threshold + THRESHOLD_MAX_ADAPT_OFFSET {
            self.last_threshold_update = Some(now_ms);
            return;
        }
        let k = if m.abs() < self.threshold {
            THRESHOLD_K_DOWN
        } else {
            THRESHOLD_K_UP
        };
        // Elapsed time capped at 100 ms so a gap does not swing the threshold.
        let dt = (now_ms - last).clamp(0.0, 100.0);
        self.threshold += k * (m.abs() - self.threshold) * dt;
        self.threshold = self.threshold.clamp(THRESHOLD_MIN, THRESHOLD_MAX);
        self.last_threshold_update = Some(now_ms);
    }
}

/// Least-squares slope of y over x; `None` if the x values do not vary.
fn linear_fit_slope(points: &VecDeque<(f64, f64)>) -> Option<f64> {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(sx, sy), (x, y)| (sx + x, sy + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points.iter().fold((0.0, 0.0), |(num, den), (x, y)| {
        (num + (x - mx) * (y - my), den + (x - mx) * (x - mx))
    });
    (den > 0.0).then(|| num / den)
}

/// AIMD rate controller state (GCC §5.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RateState {
    Hold,
    Increase,
    Decrease,
}

/// Running estimate of the receive rate at which the link congested (libwebrtc's "link capacity
/// estimator"), in kbit/s: near it the controller increases additively.
#[derive(Debug, Clone, Copy)]
struct CongestionPoint {
    mean_kbps: f64,
    /// Variance normalised by the mean.
    var: f64,
}

impl CongestionPoint {
    /// Smoothing of new samples.
    const ALPHA: f64 = 0.05;

    fn new(sample_kbps: f64) -> Self {
        Self {
            mean_kbps: sample_kbps,
            var: 0.4,
        }
    }

    fn update(&mut self, sample_kbps: f64) {
        self.mean_kbps = (1.0 - Self::ALPHA) * self.mean_kbps + Self::ALPHA * sample_kbps;
        let norm = self.mean_kbps.max(1.0);
        let err = self.mean_kbps - sample_kbps;
        self.var =
            ((1.0 - Self::ALPHA) * self.var + Self::ALPHA * err * err / norm).clamp(0.4, 2.5);
    }

    fn deviation_kbps(&self) -> f64 {
        (self.var * self.mean_kbps).sqrt()
    }

    fn upper_kbps(&self) -> f64 {
        self.mean_kbps + 3.0 * self.deviation_kbps()
    }

    fn lower_kbps(&self) -> f64 {
        self.mean_kbps - 3.0 * self.deviation_kbps()
    }
}

/// Bits per second over a sliding window of (time ms, bytes) samples.
#[derive(Debug, Clone, Default)]
struct RateWindow {
    samples: VecDeque<(f64, usize)>,
    bytes: usize,
}

impl RateWindow {
    fn add(&mut self, t_ms: f64, bytes: usize) {
        self.samples.push_back((t_ms, bytes));
        self.bytes += bytes;
    }

    /// Drops samples older than the window before `now_ms`.
    fn trim(&mut self, now_ms: f64) {
        let window = RATE_WINDOW.as_secs_f64() * 1000.0;
        while let Some(&(t, b)) = self.samples.front() {
            if now_ms - t <= window {
                break;
            }
            self.samples.pop_front();
            self.bytes -= b;
        }
    }

    /// Rate over the window ending at `now_ms`, if there are samples.
    fn rate_bps(&self, now_ms: f64) -> Option<f64> {
        let &(first, _) = self.samples.front()?;
        let min_span = RATE_MIN_SPAN.as_secs_f64() * 1000.0;
        let span = (now_ms - first).max(min_span);
        Some(self.bytes as f64 * 8.0 * 1000.0 / span)
    }
}

/// Where `deque`'s next `push_back` will most likely write: just past its last entry (when the
/// ring wraps there instead, the hint is a line off: harmless for a prefetch).
fn next_entry<T>(deque: &VecDeque<T>) -> crate::prefetch::Range {
    let (front, back) = deque.as_slices();
    let last = if back.is_empty() { front } else { back };
    (last.as_ptr_range().end as usize, size_of::<T>())
}

/// Send-side bandwidth estimator of one subscriber transport.
#[derive(Debug, Clone)]
pub struct SendSideBwe {
    config: BweConfig,
    /// Reference of the send-time millisecond scale.
    epoch: Instant,
    /// Sent packets by unwrapped transport-wide sequence number.
    history: SentHistory,
    last_sent_seq: Option<u64>,

    inter_arrival: InterArrival,
    detector: DelayDetector,
    rate_state: RateState,
    /// Delay-based estimate, bit/s.
    delay_estimate: f64,
    congestion_point: Option<CongestionPoint>,
    last_rate_update: Option<Instant>,
    last_decrease: Option<Instant>,

    /// Loss-based estimate (the final one, capped by the delay-based one), bit/s.
    estimate: f64,
    loss_interval_start: Option<Instant>,
    loss_interval_lost: u32,
    loss_interval_total: u32,
    loss_fraction: f32,
    last_loss_update: Option<Instant>,
    last_loss_decrease: Option<Instant>,

    /// Received bytes by arrival time (receiver clock, ms).
    acked_rate: RateWindow,
    /// Sent bytes by send time (ms since `epoch`).
    sent_rate: RateWindow,
    rtt_samples: VecDeque<Duration>,
    /// Send time of the oldest packet sent since the last feedback.
    unreported_since: Option<Instant>,
    last_timeout_decrease: Option<Instant>,
    last_send: Option<Instant>,

    /// The cluster being sent.
    probe: Option<ProbeCluster>,
    /// Clusters sent, awaiting their feedback.
    probes_pending: Vec<ProbeCluster>,
    probe_results: VecDeque<ProbeResult>,
    next_probe_id: u32,
}

impl SendSideBwe {
    /// An estimator starting at `config.initial` (clamped to `[min, max]`).
    pub fn new(config: BweConfig, now: Instant) -> Self {
        let (min, max) = (
            config.min.as_bps(),
            config.max.as_bps().max(config.min.as_bps()),
        );
        let initial = config.initial.as_bps().clamp(min, max) as f64;
        Self {
            config,
            epoch: now,
            history: SentHistory::default(),
            last_sent_seq: None,
            inter_arrival: InterArrival::default(),
            detector: DelayDetector::new(),
            rate_state: RateState::Hold,
            delay_estimate: initial,
            congestion_point: None,
            last_rate_update: None,
            last_decrease: None,
            estimate: initial,
            loss_interval_start: None,
            loss_interval_lost: 0,
            loss_interval_total: 0,
            loss_fraction: 0.0,
            last_loss_update: None,
            last_loss_decrease: None,
            acked_rate: RateWindow::default(),
            sent_rate: RateWindow::default(),
            rtt_samples: VecDeque::with_capacity(RTT_SAMPLES),
            unreported_since: None,
            last_timeout_decrease: None,
            last_send: None,
            probe: None,
            probes_pending: Vec::new(),
            probe_results: VecDeque::new(),
            next_probe_id: 0,
        }
    }

    /// A packet with transport-wide sequence number `twcc_seq` and `size_bytes` on the wire was
    /// sent at `now`.
    pub fn handle_sent(&mut self, twcc_seq: u16, size_bytes: usize, now: Instant) {
        let seq = match self.last_sent_seq {
            // Start well away from zero so that reordering around the first packet unwraps.
            None => (1 << 32) + u64::from(twcc_seq),
            Some(last) => unwrap_near(last, twcc_seq),
        };
        if self.last_sent_seq.is_none_or(|last| seq > last) {
            self.last_sent_seq = Some(seq);
        }
        let probe = self
            .probe
            .as_mut()
            .filter(|c| now < c.start + PROBE_DURATION)
            .map(|c| {
                c.bytes += size_bytes;
                let (first, _) = c.seqs.unwrap_or((seq, seq));
                c.seqs = Some((first, seq));
                c.id
            });
        self.history.insert(
            seq,
            SentPacket {
                send_time: now,
                size: size_bytes,
                counted: false,
                acked: false,
                arrival_ms: None,
                probe,
            },
        );
        let now_ms = self.ms_since_epoch(now);
        self.sent_rate.add(now_ms, size_bytes);
        if seq % HOUSEKEEPING_EVERY == 0 {
            // The oldest entries are cold in the cache by now: reading them for every packet
            // cost a busy edge more than recording the packet did.
            self.sent_rate.trim(now_ms);
            self.prune_history(now);
        } else if self.history.len() > HISTORY_MAX {
            self.history.pop_front();
        }
        self.check_feedback_timeout(now);
    }

    /// Where [`handle_sent`](Self::handle_sent) will write the next packet: the history's and
    /// the sent-rate window's next entries, behind pointers (for [`crate::prefetch`]).
    pub fn next_entries(&self) -> [crate::prefetch::Range; 2] {
        [
            next_entry(&self.history.slots),
            next_entry(&self.sent_rate.samples),
        ]
    }

    /// A transport-wide-cc feedback message arrived at `now`; `statuses` are its packets in
    /// any order.
    pub fn handle_feedback(&mut self, statuses: &[TwccPacketStatus], now: Instant) {
        let Some(last_sent) = self.last_sent_seq else {
            return;
        };
        let mut acked: Vec<(u64, Instant, f64, usize)> = Vec::with_capacity(statuses.len());
        let (mut lost, mut total) = (0u32, 0u32);
        for status in statuses {
            let seq = unwrap_near(last_sent, status.seq);
            let Some(packet) = self.history.get_mut(seq) else {
                continue;
            };
            if !packet.counted {
                packet.counted = true;
                total += 1;
                if status.arrival.is_none() {
                    lost += 1;
                }
            }
            if let Some(arrival) = status.arrival {
                if !packet.acked {
                    packet.acked = true;
                    let arrival_ms = arrival.as_secs_f64() * 1000.0;
                    packet.arrival_ms = Some(arrival_ms);
                    acked.push((seq, packet.send_time, arrival_ms, packet.size));
                }
            }
        }
        if total == 0 && acked.is_empty() {
            return;
        }
        self.unreported_since = None;

        // RTT upper bound: the newest acked packet's feedback came back now.
        if let Some(&(_, send_time, _, _)) = acked.iter().max_by_key(|a| a.0) {
            if self.rtt_samples.len() == RTT_SAMPLES {
                self.rtt_samples.pop_front();
            }
            self.rtt_samples
                .push_back(now.saturating_duration_since(send_time));
        }

        // Delay-based part, in send order.
        acked.sort_unstable_by_key(|a| a.0);
        for &(_, send_time, arrival_ms, size) in &acked {
            self.acked_rate.add(arrival_ms, size);
            let send_ms = self.ms_since_epoch(send_time);
            if let Some(delta) = self.inter_arrival.add(send_ms, arrival_ms) {
                if (delta.arrival_delta - delta.send_delta).abs() > ARRIVAL_JUMP_MS {
                    self.inter_arrival = InterArrival::default();
                    self.detector = DelayDetector::new();
                } else {
                    self.detector.update(delta);
                }
            }
        }
        let newest_arrival = acked.iter().map(|a| a.2).fold(f64::NEG_INFINITY, f64::max);
        if newest_arrival.is_finite() {
            self.acked_rate.trim(newest_arrival);
        }
        let acked_bps = self
            .acked_rate
            .samples
            .back()
            .and_then(|&(t, _)| self.acked_rate.rate_bps(t));
        self.update_delay_based(acked_bps, now);

        // Loss-based part.
        self.loss_interval_lost += lost;
        self.loss_interval_total += total;
        let interval_start = *self.loss_interval_start.get_or_insert(now);
        if self.loss_interval_total >= LOSS_INTERVAL_PACKETS
            && now.saturating_duration_since(interval_start) >= LOSS_INTERVAL_TIME
        {
            self.loss_fraction = self.loss_interval_lost as f32 / self.loss_interval_total as f32;
            self.loss_interval_lost = 0;
            self.loss_interval_total = 0;
            self.loss_interval_start = Some(now);
            self.update_loss_based(acked_bps, now);
        }
        self.estimate = self.estimate.min(self.delay_estimate);
        self.estimate = self.clamp(self.estimate);
        self.conclude_probes(now);
    }

    /// Starts a probe cluster at `goal` (see the module docs); `None` while another cluster is
    /// being sent or awaits its feedback. The caller then tops its sending up to the goal with
    /// [`Self::probe_bytes_due`].
    pub fn start_probe(&mut self, goal: Bitrate, now: Instant) -> Option<u32> {
        if self.probe.is_some() || !self.probes_pending.is_empty() {
            return None;
        }
        let id = self.next_probe_id;
        self.next_probe_id = self.next_probe_id.wrapping_add(1);
        self.probe = Some(ProbeCluster {
            id,
            goal_bps: self.clamp(goal.as_bps() as f64),
            start: now,
            bytes: 0,
            seqs: None,
        });
        Some(id)
    }

    /// Whether a probe cluster is being sent or awaits its verdict.
    pub fn probing(&self) -> bool {
        self.probe.is_some() || !self.probes_pending.is_empty()
    }

    /// Bytes to send now, on top of the media, to keep the running probe cluster at its goal
    /// rate (0 when none runs). Ends the cluster when its time is up; call it on every tick.
    pub fn probe_bytes_due(&mut self, now: Instant) -> usize {
        self.conclude_probes(now);
        let Some(c) = self.probe else {
            return 0;
        };
        let elapsed = now.saturating_duration_since(c.start);
        if elapsed >= PROBE_DURATION {
            self.probe = None;
            self.probes_pending.push(c);
            return 0;
        }
        let goal_bytes = c.goal_bps * elapsed.as_secs_f64() / 8.0;
        (goal_bytes as usize).saturating_sub(c.bytes)
    }

    /// The next probe verdict, in the order the clusters were started.
    pub fn poll_probe_result(&mut self) -> Option<ProbeResult> {
        self.probe_results.pop_front()
    }

    /// Judges the sent clusters whose feedback is complete (or overdue).
    fn conclude_probes(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.probes_pending.len() {
            let c = self.probes_pending[i];
            let cluster = || {
                c.seqs
                    .into_iter()
                    .flat_map(|(first, last)| self.history.range(first, last))
                    .filter(move |p| p.probe == Some(c.id))
            };
            // Asked every tick while feedback is awaited: look, and copy only to conclude.
            let reported = cluster().all(|p| p.counted);
            let overdue =
                now.saturating_duration_since(c.start) >= PROBE_DURATION + PROBE_FEEDBACK_TIMEOUT;
            if !(reported || overdue) {
                i += 1;
                continue;
            }
            let sent: Vec<SentPacket> = cluster().copied().collect();
            self.probes_pending.remove(i);
            let measured = self.probe_rate(&sent);
            let carried = measured.and_then(|(rate, saturated)| (!saturated).then_some(rate));
            let success = carried.is_some_and(|r| r >= PROBE_SUCCESS_RATIO * c.goal_bps);
            if let Some(rate) = carried {
                self.apply_probe(rate);
            }
            let measured = measured.map(|(rate, _)| rate);
            self.probe_results.push_back(ProbeResult {
                id: c.id,
                goal: Bitrate::bps(c.goal_bps as u64),
                measured: measured.map(|r| Bitrate::bps(r as u64)),
                success,
            });
        }
    }

    /// What a cluster's packets (in send order) show the path carries, bit/s, and whether the
    /// probe saturated it.
    fn probe_rate(&self, sent: &[SentPacket]) -> Option<(f64, bool)> {
        // The first third may have ridden a token bucket's burst: not measured.
        let measured = &sent[sent.len() / 3..];
        let received: Vec<(f64, f64, usize)> = measured
            .iter()
            .filter_map(|p| Some((self.ms_since_epoch(p.send_time), p.arrival_ms?, p.size)))
            .collect();
        if received.len() < PROBE_MIN_PACKETS {
            return None;
        }
        let lost = measured
            .iter()
            .filter(|p| p.counted && p.arrival_ms.is_none())
            .count();
        let loss = lost as f64 / measured.len() as f64;
        let first_send = received.iter().map(|r| r.0).fold(f64::INFINITY, f64::min);
        let last_send = received
            .iter()
            .map(|r| r.0)
            .fold(f64::NEG_INFINITY, f64::max);
        let (first_arrival, first_size) = received
            .iter()
            .map(|r| (r.1, r.2))
            .fold((f64::INFINITY, 0), |a, b| if b.0 < a.0 { b } else { a });
        let last_arrival = received
            .iter()
            .map(|r| r.1)
            .fold(f64::NEG_INFINITY, f64::max);
        let total: usize = received.iter().map(|r| r.2).sum();
        let last_size = received.last().map_or(0, |r| r.2);
        // Rates between the first and last packet: the last one's bytes were not yet on the
        // wire when its send time was taken, the first one's had arrived already.
        let send_bps = (total - last_size) as f64 * 8000.0 / (last_send - first_send).max(1.0);
        let recv_bps =
            (total - first_size) as f64 * 8000.0 / (last_arrival - first_arrival).max(1.0);
        Some(
            if recv_bps < PROBE_SATURATED_RATIO * send_bps || loss > PROBE_MAX_LOSS {
                (PROBE_SATURATED_USE * recv_bps, true)
            } else {
                (send_bps.min(recv_bps), false)
            },
        )
    }

    /// A probe showed the path carries `rate`: the estimate may rise to it.
    fn apply_probe(&mut self, rate: f64) {
        if self.detector.usage == Usage::Over || rate <= self.estimate {
            return;
        }
        let rate = self.clamp(rate);
        if self
            .congestion_point
            .is_some_and(|cp| rate / 1000.0 > cp.upper_kbps())
        {
            self.congestion_point = None;
        }
        self.estimate = rate;
        self.delay_estimate = self.delay_estimate.max(rate);
    }

    /// Current estimate of the path's available bitrate.
    pub fn estimate(&self) -> Bitrate {
        Bitrate::bps(self.clamp(self.estimate) as u64)
    }

    /// Fraction of packets lost in the latest closed loss interval (a few hundred ms).
    pub fn loss_fraction(&self) -> f32 {
        self.loss_fraction
    }

    /// Round-trip time from the sender's view: the smallest of the recent (feedback arrival −
    /// send time of the newest packet it acknowledges). An upper bound: it includes the time the
    /// receiver waited before sending feedback (up to its feedback interval, 50-100 ms in
    /// browsers). `None` before the first feedback.
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt_samples.iter().min().copied()
    }

    /// Cuts the estimate when packets sent long ago still have no feedback at all.
    fn check_feedback_timeout(&mut self, now: Instant) {
        let resumed = self
            .last_send
            .is_some_and(|t| now.saturating_duration_since(t) >= FEEDBACK_TIMEOUT);
        self.last_send = Some(now);
        if resumed {
            // After an idle pause, feedback missing for packets sent before it is no news.
            self.unreported_since = Some(now);
        }
        let since = *self.unreported_since.get_or_insert(now);
        let silent = now.saturating_duration_since(since) >= FEEDBACK_TIMEOUT;
        let may_cut = self
            .last_timeout_decrease
            .is_none_or(|t| now.saturating_duration_since(t) >= FEEDBACK_TIMEOUT);
        if silent && may_cut {
            self.estimate = self.clamp(self.estimate * FEEDBACK_TIMEOUT_FACTOR);
            self.delay_estimate = self.clamp(self.delay_estimate.min(self.estimate));
            self.last_timeout_decrease = Some(now);
        }
    }

    fn clamp(&self, bps: f64) -> f64 {
        let min = self.config.min.as_bps() as f64;
        let max = (self.config.max.as_bps() as f64).max(min);
        bps.clamp(min, max)
    }

    fn ms_since_epoch(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.epoch).as_secs_f64() * 1000.0
    }

    fn prune_history(&mut self, now: Instant) {
        while let Some(first) = self.history.front() {
            let old =
                first.is_none_or(|p| now.saturating_duration_since(p.send_time) > HISTORY_AGE);
            if !old && self.history.len() <= HISTORY_MAX {
                break;
            }
            self.history.pop_front();
        }
    }

    /// AIMD rate controller (GCC §5.5) on the detector's current signal.
    fn update_delay_based(&mut self, acked_bps: Option<f64>, now: Instant) {
        self.rate_state = match (self.detector.usage, self.rate_state) {
            (Usage::Over, _) => RateState::Decrease,
            (Usage::Under, _) => RateState::Hold,
            (Usage::Normal, RateState::Hold | RateState::Increase) => RateState::Increase,
            (Usage::Normal, RateState::Decrease) => RateState::Hold,
        };
        let elapsed = self
            .last_rate_update
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
            .min(MAX_INCREASE_STEP);
        self.last_rate_update = Some(now);

        match self.rate_state {
            RateState::Hold => {}
            RateState::Increase => {
                let before = self.delay_estimate;
                let acked_kbps = acked_bps.map(|b| b / 1000.0);
                if let (Some(cp), Some(acked)) = (self.congestion_point, acked_kbps) {
                    if acked > cp.upper_kbps() {
                        // The link carries more than where it last congested: forget that point.
                        self.congestion_point = None;
                    }
                }
                let near_congestion = self
                    .congestion_point
                    .is_some_and(|cp| self.delay_estimate / 1000.0 < cp.upper_kbps());
                if near_congestion {
                    let response =
                        self.rtt().unwrap_or(Duration::from_millis(100)) + RESPONSE_TIME_EXTRA;
                    let per_sec = ADDITIVE_PACKET_BITS / response.as_secs_f64();
                    self.delay_estimate += per_sec * elapsed.as_secs_f64();
                } else {
                    self.delay_estimate *= ETA_PER_SEC.powf(elapsed.as_secs_f64());
                }
                // GCC's cap: no growth beyond what the path has been seen to carry (probes
                // lift the estimate past it).
                let cap = acked_bps.map_or(0.0, |a| ACKED_CAP_FACTOR * a + ACKED_CAP_EXTRA_BPS);
                if self.delay_estimate > cap {
                    self.delay_estimate = before.max(cap);
                }
            }
            RateState::Decrease => {
                // Reduce at most once per RTT (10..200 ms): the previous reduction must have had
                // time to drain the queue before its effect is judged.
                let min_gap = self
                    .rtt()
                    .unwrap_or(Duration::from_millis(200))
                    .clamp(Duration::from_millis(10), Duration::from_millis(200));
                let may_reduce = self
                    .last_decrease
                    .is_none_or(|t| now.saturating_duration_since(t) >= min_gap);
                if may_reduce {
                    let base = acked_bps.unwrap_or(self.delay_estimate);
                    let target = BETA * base;
                    if target < self.delay_estimate {
                        self.delay_estimate = target;
                    }
                    if let Some(acked) = acked_bps {
                        let kbps = acked / 1000.0;
                        match self.congestion_point.as_mut() {
                            Some(cp) if kbps >= cp.lower_kbps() => cp.update(kbps),
                            // Congested well below the old point: the path changed.
                            _ => self.congestion_point = Some(CongestionPoint::new(kbps)),
                        }
                    }
                    self.last_decrease = Some(now);
                }
                self.rate_state = RateState::Hold;
            }
        }
        self.delay_estimate = self.clamp(self.delay_estimate);
    }

    /// Loss-based controller (GCC §6) on the loss interval just closed.
    fn update_loss_based(&mut self, acked_bps: Option<f64>, now: Instant) {
        let elapsed = self
            .last_loss_update
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
            .min(MAX_INCREASE_STEP);
        self.last_loss_update = Some(now);
        let loss = f64::from(self.loss_fraction);
        if loss < LOSS_LOW {
            self.estimate *= ETA_PER_SEC.powf(elapsed.as_secs_f64());
        } else if loss > LOSS_HIGH {
            let gap = LOSS_DECREASE_INTERVAL + self.rtt().unwrap_or(Duration::from_millis(100));
            let may_reduce = self
                .last_loss_decrease
                .is_none_or(|t| now.saturating_duration_since(t) >= gap);
            if may_reduce {
                // Decrease from what was actually sent: an estimate far above the sent rate
                // (nothing to send) says nothing about the lossy path. And not above what got
                // through: under heavy loss that is the path's capacity (a policer shows no
                // delay trend, only this), and halving the loss alone would take seconds.
                let now_ms = self.ms_since_epoch(now);
                self.sent_rate.trim(now_ms);
                let sent = self.sent_rate.rate_bps(now_ms).unwrap_or(self.estimate);
                let mut target = self.estimate.min(sent) * (1.0 - 0.5 * loss);
                if let Some(acked) = acked_bps {
                    target = target.min(acked);
                }
                self.estimate = target;
                self.last_loss_decrease = Some(now);
            }
        }
        self.estimate = self.clamp(self.estimate);
    }
}

/// The 64-bit sequence number closest to `reference` whose low 16 bits are `seq`.
fn unwrap_near(reference: u64, seq: u16) -> u64 {
    let diff = i64::from(seq.wrapping_sub(reference as u16) as i16);
    reference.wrapping_add_signed(diff)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn sent_at(t: Instant, size: usize) -> SentPacket {
        SentPacket {
            send_time: t,
            size,
            counted: false,
            acked: false,
            arrival_ms: None,
            probe: None,
        }
    }

    fn last<T>(d: &VecDeque<T>) -> usize {
        std::ptr::from_ref(d.back().unwrap()) as usize
    }

    #[test]
    fn next_entries_are_where_the_next_sent_packet_is_written() {
        let t0 = Instant::now();
        let mut bwe = SendSideBwe::new(BweConfig::default(), t0);
        let (mut checked, mut seq) = (0, 0u16);
        for i in 0..300u64 {
            let now = t0 + ms(i);
            let hints = bwe.next_entries();
            let caps = (
                bwe.history.slots.capacity(),
                bwe.sent_rate.samples.capacity(),
            );
            bwe.handle_sent(seq, 1200, now);
            seq = seq.wrapping_add(1);
            if caps
                != (
                    bwe.history.slots.capacity(),
                    bwe.sent_rate.samples.capacity(),
                )
            {
                continue; // a deque grew: its entries moved, the hint was stale (harmless)
            }
            assert_eq!(hints[0].0, last(&bwe.history.slots), "packet {i}");
            if bwe.sent_rate.samples.as_slices().1.is_empty() {
                assert_eq!(hints[1].0, last(&bwe.sent_rate.samples), "packet {i}");
            }
            checked += 1;
        }
        assert!(checked > 250, "{checked}");
    }

    #[test]
    fn sent_history_ring_keeps_gaps_ignores_stale_and_restarts_after_a_jump() {
        let t = Instant::now();
        let mut h = SentHistory::default();
        for seq in [100u64, 101, 103] {
            h.insert(seq, sent_at(t, seq as usize));
        }
        assert_eq!(h.get_mut(101).map(|p| p.size), Some(101));
        assert!(h.get_mut(102).is_none(), "a gap stays empty");
        assert!(h.get_mut(99).is_none() && h.get_mut(104).is_none());
        assert_eq!(
            h.range(0, 1000).map(|p| p.size).collect::<Vec<_>>(),
            vec![100, 101, 103]
        );
        assert_eq!(h.range(102, 103).count(), 1);
        h.insert(50, sent_at(t, 50));
        assert!(h.get_mut(50).is_none(), "older than the history: dropped");
        h.pop_front();
        assert!(h.get_mut(100).is_none());
        assert_eq!(h.len(), 3);
        let far = 103 + HISTORY_MAX as u64 + 1;
        h.insert(far, sent_at(t, 7));
        assert_eq!(h.len(), 1, "a jump past the bound starts afresh");
        assert_eq!(h.get_mut(far).map(|p| p.size), Some(7));
    }

    /// xorshift64*: a seeded generator, so a failing run replays.
    struct Rng(u64);

    impl Rng {
        fn next_f64(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// A bottleneck: a token bucket (`burst` bytes, 0 for none) in front of a drop-tail queue
    /// served at `capacity_bps` (like Linux `tbf`), then `propagation` delay plus up to `jitter`
    /// of random extra delay, and optional random loss.
    struct Link {
        capacity_bps: u64,
        burst: f64,
        /// Tokens left when the queue's last packet left.
        tokens: f64,
        buffer: Duration,
        propagation: Duration,
        jitter: Duration,
        random_loss: f64,
        /// When the queue's last packet has left.
        free_at: Instant,
        drops: u64,
        delivered: u64,
    }

    impl Link {
        /// Arrival time at the receiver, or `None` if dropped.
        fn send(&mut self, now: Instant, size: usize, rng: &mut Rng) -> Option<Instant> {
            let loss_draw = rng.next_f64();
            let jitter_draw = rng.next_f64();
            if loss_draw < self.random_loss {
                self.drops += 1;
                return None;
            }
            let byte_time = 8.0 / self.capacity_bps as f64;
            let start = self.free_at.max(now);
            let refill = start.saturating_duration_since(self.free_at).as_secs_f64() / byte_time;
            let tokens = (self.tokens + refill).min(self.burst);
            let wait = Duration::from_secs_f64((size as f64 - tokens).max(0.0) * byte_time);
            let depart = start + wait;
            if depart.saturating_duration_since(now) > self.buffer {
                self.drops += 1;
                return None;
            }
            self.tokens = (tokens - size as f64).max(0.0);
            self.free_at = depart;
            self.delivered += 1;
            Some(depart + self.propagation + self.jitter.mul_f64(jitter_draw))
        }
    }

    /// Sender + link + receiver with feedback every 50 ms, stepped in 1 ms.
    struct Sim {
        t0: Instant,
        now: Instant,
        rng: Rng,
        bwe: SendSideBwe,
        link: Link,
        /// What the application has to send.
        source_bps: u64,
        packet_size: usize,
        /// Pacing budget in bits.
        budget: f64,
        /// Unwrapped sequence number of the next packet; the wire carries `seq_offset + n`.
        next_seq: u64,
        seq_offset: u16,
        /// (arrival, seq) of packets on the way.
        in_flight: VecDeque<(Instant, u64)>,
        /// Received (seq, arrival) not yet reported, and the next seq to report.
        received: BTreeMap<u64, Instant>,
        next_report: u64,
        last_feedback: Instant,
        /// Feedback messages on the way back: (delivery time, statuses).
        feedback: VecDeque<(Instant, Vec<TwccPacketStatus>)>,
        /// The receiver clock's epoch is unrelated to ours.
        receiver_epoch_offset: Duration,
    }

    const FEEDBACK_INTERVAL: Duration = Duration::from_millis(50);

    impl Sim {
        fn new(config: BweConfig, link: Link, source_bps: u64, seed: u64) -> Self {
            let t0 = Instant::now();
            Self {
                t0,
                now: t0,
                rng: Rng(seed),
                bwe: SendSideBwe::new(config, t0),
                link: Link {
                    free_at: t0,
                    ..link
                },
                source_bps,
                packet_size: 1200,
                budget: 0.0,
                next_seq: 0,
                seq_offset: 0,
                in_flight: VecDeque::new(),
                received: BTreeMap::new(),
                next_report: 0,
                last_feedback: t0,
                feedback: VecDeque::new(),
                receiver_epoch_offset: Duration::from_secs(123_456),
            }
        }

        fn elapsed_ms(&self) -> u64 {
            (self.now - self.t0).as_millis() as u64
        }

        fn step(&mut self) {
            self.now += ms(1);
            let now = self.now;
            // Sender: paced at min(estimate, source).
            let rate = self.bwe.estimate().as_bps().min(self.source_bps) as f64;
            let bits = self.packet_size as f64 * 8.0;
            // At most 20 ms of burst (or one packet) saved up.
            self.budget = (self.budget + rate / 1000.0).min((rate / 1000.0 * 20.0).max(bits));
            while self.budget >= bits {
                self.budget -= bits;
                self.send_packet();
            }
            // Probe padding on top, in the same packets.
            let mut due = self.bwe.probe_bytes_due(now);
            while due > 0 {
                self.send_packet();
                due = due.saturating_sub(self.packet_size);
            }
            // Receiver.
            self.in_flight.make_contiguous().sort_by_key(|p| p.0);
            while self.in_flight.front().is_some_and(|p| p.0 <= now) {
                let (arrival, seq) = self.in_flight.pop_front().unwrap();
                if seq >= self.next_report {
                    self.received.insert(seq, arrival);
                }
            }
            if now - self.last_feedback >= FEEDBACK_INTERVAL {
                self.last_feedback = now;
                if let Some((&highest, _)) = self.received.last_key_value() {
                    let statuses = (self.next_report..=highest)
                        .map(|seq| TwccPacketStatus {
                            seq: self.seq_offset.wrapping_add(seq as u16),
                            arrival: self
                                .received
                                .get(&seq)
                                .map(|a| *a - self.t0 + self.receiver_epoch_offset),
                        })
                        .collect();
                    self.received.clear();
                    self.next_report = highest + 1;
                    self.feedback
                        .push_back((now + self.link.propagation, statuses));
                }
            }
            // Feedback back at the sender.
            while self.feedback.front().is_some_and(|f| f.0 <= now) {
                let (_, statuses) = self.feedback.pop_front().unwrap();
                self.bwe.handle_feedback(&statuses, now);
            }
        }

        fn send_packet(&mut self) {
            let seq = self.next_seq;
            self.next_seq += 1;
            let wire = self.seq_offset.wrapping_add(seq as u16);
            self.bwe.handle_sent(wire, self.packet_size, self.now);
            if let Some(arrival) = self.link.send(self.now, self.packet_size, &mut self.rng) {
                self.in_flight.push_back((arrival, seq));
            }
        }

        /// Runs until `until_ms` and returns the estimate (bit/s) sampled every 100 ms.
        fn run_until(&mut self, until_ms: u64) -> Vec<u64> {
            let mut samples = Vec::new();
            while self.elapsed_ms() < until_ms {
                self.step();
                let t = self.elapsed_ms();
                if t / 100 * 100 == t {
                    samples.push(self.bwe.estimate().as_bps());
                }
            }
            samples
        }
    }

    fn link(capacity_bps: u64) -> Link {
        Link {
            capacity_bps,
            burst: 0.0,
            tokens: 0.0,
            buffer: ms(300),
            propagation: ms(25),
            jitter: ms(2),
            random_loss: 0.0,
            free_at: Instant::now(),
            drops: 0,
            delivered: 0,
        }
    }

    fn mean(v: &[u64]) -> f64 {
        v.iter().sum::<u64>() as f64 / v.len() as f64
    }

    #[test]
    fn converges_under_bottleneck_without_sustained_loss() {
        for (capacity, seed) in [(2_000_000, 1), (600_000, 2), (5_000_000, 3)] {
            let mut sim = Sim::new(BweConfig::default(), link(capacity), 20_000_000, seed);
            sim.run_until(10_000);
            let (drops0, delivered0) = (sim.link.drops, sim.link.delivered);
            let est = sim.run_until(40_000);
            let avg = mean(&est);
            let drops = sim.link.drops - drops0;
            let delivered = sim.link.delivered - delivered0;
            let loss = drops as f64 / (drops + delivered) as f64;
            eprintln!("capacity {capacity}: mean estimate {avg:.0}, loss {loss:.4}");
            assert!(
                avg < capacity as f64 * 1.05 && avg > capacity as f64 * 0.6,
                "capacity {capacity}: mean estimate {avg:.0}"
            );
            assert!(loss < 0.02, "capacity {capacity}: loss {loss}");
        }
    }

    #[test]
    fn climbs_when_capacity_rises() {
        let mut sim = Sim::new(BweConfig::default(), link(1_000_000), 20_000_000, 7);
        let before = sim.run_until(20_000);
        assert!(*before.last().unwrap() < 1_100_000, "{before:?}");
        sim.link.capacity_bps = 4_000_000;
        let after = sim.run_until(40_000);
        let reached = after.iter().position(|&e| e > 3_000_000);
        eprintln!("reached 3 Mbit/s after {reached:?} x 100 ms");
        assert!(
            reached.is_some_and(|i| i <= 200),
            "estimate after the rise: {after:?}"
        );
    }

    #[test]
    fn drops_quickly_when_capacity_falls() {
        let mut sim = Sim::new(BweConfig::default(), link(4_000_000), 20_000_000, 11);
        let before = sim.run_until(20_000);
        assert!(*before.last().unwrap() > 2_500_000, "{before:?}");
        sim.link.capacity_bps = 1_000_000;
        let after = sim.run_until(30_000);
        let below = after.iter().position(|&e| e < 1_000_000);
        eprintln!("below capacity after {below:?} x 100 ms");
        assert!(below.is_some_and(|i| i <= 20), "{after:?}");
    }

    #[test]
    fn drops_quickly_under_a_policer() {
        // A policer (token bucket with almost no queue) shows no delay trend, only loss. GCC
        // tolerates 2-10 % loss (it may be random), so the estimate settles within ~10 % above
        // the policed rate rather than below it; it must get there fast, and loss must stay
        // inside the tolerated band.
        let mut l = link(4_000_000);
        // Two packets' worth at the final 1 Mbit/s.
        l.buffer = ms(20);
        let mut sim = Sim::new(BweConfig::default(), l, 20_000_000, 17);
        let before = sim.run_until(20_000);
        assert!(*before.last().unwrap() > 2_500_000, "{before:?}");
        sim.link.capacity_bps = 1_000_000;
        let after = sim.run_until(22_000);
        assert!(*after.last().unwrap() < 1_100_000, "{after:?}");
        let (drops0, delivered0) = (sim.link.drops, sim.link.delivered);
        let after = sim.run_until(32_000);
        assert!(after.iter().all(|&e| e < 1_100_000), "{after:?}");
        let drops = sim.link.drops - drops0;
        let loss = drops as f64 / (drops + sim.link.delivered - delivered0) as f64;
        assert!(loss < 0.10, "loss {loss}");
    }

    #[test]
    fn app_limited_estimate_stays_near_what_is_sent() {
        // Only 300 kbit/s to send (a low simulcast layer) on a 5 Mbit/s path: GCC's cap keeps
        // the estimate within 1.5x of that; only a probe may show more.
        let config = BweConfig {
            initial: Bitrate::kbps(300),
            ..Default::default()
        };
        let mut sim = Sim::new(config, link(5_000_000), 300_000, 5);
        let est = sim.run_until(20_000);
        assert!(est.iter().all(|&e| e <= 500_000), "{est:?}");
        assert!(*est.last().unwrap() >= 300_000, "{est:?}");
    }

    /// Runs a 300 kbit/s app-limited sender on `link`, probes at `goal` and returns the verdict
    /// and the estimate before and after.
    fn probe_on(link: Link, goal: u64, seed: u64) -> (ProbeResult, u64, u64, Sim) {
        let config = BweConfig {
            initial: Bitrate::kbps(300),
            ..Default::default()
        };
        let mut sim = Sim::new(config, link, 300_000, seed);
        sim.run_until(5_000);
        let before = sim.bwe.estimate().as_bps();
        let id = sim.bwe.start_probe(Bitrate::bps(goal), sim.now).unwrap();
        assert!(sim.bwe.probing());
        assert_eq!(sim.bwe.start_probe(Bitrate::bps(goal), sim.now), None);
        let mut result = None;
        while result.is_none() && sim.elapsed_ms() < 8_000 {
            sim.step();
            result = sim.bwe.poll_probe_result();
        }
        let result = result.expect("a verdict within 3 s");
        assert_eq!(result.id, id);
        assert!(!sim.bwe.probing());
        (result, before, sim.bwe.estimate().as_bps(), sim)
    }

    #[test]
    fn probe_raises_the_estimate_when_the_path_carries_it() {
        let (r, before, after, _) = probe_on(link(5_000_000), 2_000_000, 21);
        eprintln!("{r:?}: {before} -> {after}");
        assert!(r.success, "{r:?}");
        assert!(
            (1_700_000..=2_200_000).contains(&after),
            "{before} -> {after}"
        );
    }

    #[test]
    fn saturated_probe_through_a_token_bucket_raises_nothing() {
        // tbf rate 700kbit burst 16kb latency 200ms: the first 16 KB pass at line rate.
        let mut l = link(700_000);
        l.burst = 16_000.0;
        l.tokens = 16_000.0;
        l.buffer = ms(200);
        l.propagation = ms(1);
        // Twice the capacity: the largest step the edge probes from an estimate at capacity.
        let (r, before, after, sim) = probe_on(l, 1_400_000, 22);
        eprintln!("{r:?}: {before} -> {after}, drops {}", sim.link.drops);
        assert!(!r.success, "{r:?}");
        let measured = r.measured.expect("enough packets for a verdict").as_bps();
        assert!(
            measured < 1_330_000,
            "measured {measured}: saturation unseen"
        );
        assert!(
            after < 700_000,
            "{before} -> {after}: raised by a saturated probe"
        );
        assert_eq!(sim.link.drops, 0, "a 200 ms probe at 2x must fit the queue");
    }

    #[test]
    fn probe_with_no_feedback_concludes_without_a_rate() {
        let now = Instant::now();
        let mut bwe = SendSideBwe::new(BweConfig::default(), now);
        let id = bwe.start_probe(Bitrate::kbps(3000), now).unwrap();
        let mut t = now;
        let mut seq = 0u16;
        while t < now + PROBE_DURATION + ms(20) {
            let mut due = bwe.probe_bytes_due(t);
            while due > 0 {
                bwe.handle_sent(seq, 1000, t);
                seq = seq.wrapping_add(1);
                due = due.saturating_sub(1000);
            }
            t += ms(10);
        }
        assert!(
            seq > 50,
            "paced to about 3 Mbit/s over 200 ms: {seq} packets"
        );
        assert_eq!(bwe.poll_probe_result(), None);
        let _ = bwe.probe_bytes_due(now + ms(1500));
        let r = bwe.poll_probe_result().expect("overdue verdict");
        assert_eq!((r.id, r.measured, r.success), (id, None, false));
        assert!(bwe
            .start_probe(Bitrate::kbps(3000), now + ms(1500))
            .is_some());
    }

    #[test]
    fn random_loss_above_ten_percent_decreases() {
        let mut l = link(50_000_000);
        l.random_loss = 0.2;
        let mut sim = Sim::new(BweConfig::default(), l, 20_000_000, 9);
        // GCC §6: each decrease takes half the loss fraction off, about every 300 ms + RTT.
        let est = sim.run_until(3000);
        let last = *est.last().unwrap();
        assert!(last < 700_000, "estimate {last}");
        assert!(sim.bwe.loss_fraction() > 0.1);
        let est = sim.run_until(6000);
        let last = *est.last().unwrap();
        assert!(last < 400_000, "estimate {last}");
    }

    #[test]
    fn random_loss_below_two_percent_still_increases() {
        let mut l = link(50_000_000);
        l.random_loss = 0.005;
        let mut sim = Sim::new(BweConfig::default(), l, 20_000_000, 9);
        let est = sim.run_until(10_000);
        let last = *est.last().unwrap();
        assert!(last > 1_500_000, "estimate {last}");
    }

    #[test]
    fn total_loss_goes_to_min() {
        // Reports of nothing but losses.
        let t0 = Instant::now();
        let mut bwe = SendSideBwe::new(BweConfig::default(), t0);
        for i in 0..10_000u32 {
            let now = t0 + ms(u64::from(i));
            bwe.handle_sent(i as u16, 1200, now);
            if i % 50 == 49 {
                let statuses: Vec<_> = (i - 49..=i)
                    .map(|s| TwccPacketStatus {
                        seq: s as u16,
                        arrival: None,
                    })
                    .collect();
                bwe.handle_feedback(&statuses, now);
            }
        }
        assert_eq!(bwe.estimate(), BweConfig::default().min);
        assert_eq!(bwe.loss_fraction(), 1.0);
    }

    #[test]
    fn no_feedback_while_sending_cuts_the_estimate() {
        // Nothing arrives, so the receiver never reports.
        let mut l = link(50_000_000);
        l.random_loss = 1.0;
        let mut sim = Sim::new(BweConfig::default(), l, 20_000_000, 9);
        let est = sim.run_until(5_000);
        // One cut per second of silence, the first after one second.
        assert_eq!(est[5], 1_000_000);
        assert_eq!(est[15], 800_000);
        let last = *est.last().unwrap();
        assert!((327_680..=409_600).contains(&last), "estimate {last}");
    }

    #[test]
    fn idle_sender_is_not_cut() {
        // Nothing sent for a long time (no subscriptions), then sending resumes: no timeout.
        let t0 = Instant::now();
        let mut bwe = SendSideBwe::new(BweConfig::default(), t0);
        bwe.handle_sent(1, 1200, t0);
        bwe.handle_feedback(
            &[TwccPacketStatus {
                seq: 1,
                arrival: Some(ms(10)),
            }],
            t0 + ms(60),
        );
        let before = bwe.estimate();
        bwe.handle_sent(2, 1200, t0 + ms(30_000));
        assert_eq!(bwe.estimate(), before);
    }

    #[test]
    fn idle_pause_after_unanswered_packet_is_not_cut() {
        let t0 = Instant::now();
        let mut bwe = SendSideBwe::new(BweConfig::default(), t0);
        // Its feedback is lost, then nothing is sent for 10 s.
        bwe.handle_sent(1, 1200, t0);
        bwe.handle_sent(2, 1200, t0 + ms(10_000));
        bwe.handle_sent(3, 1200, t0 + ms(10_020));
        assert_eq!(bwe.estimate(), Bitrate::kbps(1000));
        // But continued silence after resuming is.
        bwe.handle_sent(4, 1200, t0 + ms(10_800));
        bwe.handle_sent(5, 1200, t0 + ms(11_001));
        assert_eq!(bwe.estimate(), Bitrate::kbps(800));
    }

    #[test]
    fn receiver_clock_jump_does_not_signal_overuse() {
        // Steady stream well under the estimate; the receiver's clock jumps 10 s ahead once.
        let t0 = Instant::now();
        let mut bwe = SendSideBwe::new(BweConfig::default(), t0);
        let mut offset = 0;
        for i in 0..3000u64 {
            let send = t0 + ms(i * 10);
            bwe.handle_sent(i as u16, 1200, send);
            if i == 1500 {
                offset = 10_000;
            }
            let arrival = Some(ms(i * 10 + 20 + offset));
            bwe.handle_feedback(
                &[TwccPacketStatus {
                    seq: i as u16,
                    arrival,
                }],
                send + ms(40),
            );
            assert_ne!(bwe.detector.usage, Usage::Over, "packet {i}");
        }
        assert!(bwe.estimate() > Bitrate::kbps(1000));
    }

    #[test]
    fn sequence_wraparound_changes_nothing() {
        // The same seeded run with wire sequence numbers starting at 0 and just before the wrap
        // (and wrapping several times): identical estimates.
        let run = |offset: u16| {
            let mut sim = Sim::new(BweConfig::default(), link(3_000_000), 20_000_000, 42);
            sim.seq_offset = offset;
            sim.run_until(30_000)
        };
        let plain = run(0);
        let wrapped = run(65_500);
        assert_eq!(plain, wrapped);
        // ~30 s at ~3 Mbit/s in 1200-byte packets is ~9000 packets: the 65_500 run wrapped.
        assert!(mean(&plain) > 1_500_000.0);
    }

    #[test]
    fn long_run_wraps_twcc_sequence_many_times() {
        let mut sim = Sim::new(BweConfig::default(), link(8_000_000), 20_000_000, 13);
        let est = sim.run_until(200_000);
        assert!(sim.next_seq > 2 * 65_536, "sent {}", sim.next_seq);
        let tail = &est[est.len() - 300..];
        let avg = mean(tail);
        assert!(avg > 4_800_000.0 && avg < 8_400_000.0, "mean {avg}");
    }

    #[test]
    fn unknown_duplicate_and_early_feedback_is_ignored() {
        let t0 = Instant::now();
        let mut bwe = SendSideBwe::new(BweConfig::default(), t0);
        // Feedback before anything was sent.
        bwe.handle_feedback(
            &[TwccPacketStatus {
                seq: 5,
                arrival: None,
            }],
            t0,
        );
        assert_eq!(bwe.estimate(), Bitrate::kbps(1000));
        for i in 0..30u16 {
            bwe.handle_sent(i, 1000, t0 + ms(u64::from(i)));
        }
        let report: Vec<_> = (0..30u16)
            .map(|s| TwccPacketStatus {
                seq: s,
                arrival: Some(Duration::from_millis(1000 + u64::from(s))),
            })
            .collect();
        bwe.handle_feedback(&report, t0 + ms(300));
        // The same report again, and reports about packets never sent, count no loss.
        bwe.handle_feedback(&report, t0 + ms(350));
        let bogus: Vec<_> = (1000..1100u16)
            .map(|s| TwccPacketStatus {
                seq: s,
                arrival: None,
            })
            .collect();
        bwe.handle_feedback(&bogus, t0 + ms(600));
        assert_eq!(bwe.loss_fraction(), 0.0);
        assert!(bwe.estimate() >= Bitrate::kbps(1000));
        assert_eq!(bwe.rtt(), Some(ms(300 - 29)));
    }

    #[test]
    fn config_bounds_are_respected() {
        let t0 = Instant::now();
        let config = BweConfig {
            initial: Bitrate::kbps(50_000),
            min: Bitrate::kbps(100),
            max: Bitrate::kbps(2000),
        };
        let bwe = SendSideBwe::new(config, t0);
        assert_eq!(bwe.estimate(), Bitrate::kbps(2000));
    }

    #[test]
    fn trendline_signals_overuse_on_growing_delay_only() {
        // Groups every 10 ms; in the first case each arrives 10 ms later (flat), in the second
        // each arrives 11 ms later (a queue growing by 1 ms per group).
        for (arrival_step, expect_over) in [(10.0, false), (11.0, true)] {
            let mut ia = InterArrival::default();
            let mut det = DelayDetector::new();
            let mut over = false;
            for i in 0..100 {
                let send = f64::from(i) * 10.0;
                if let Some(d) = ia.add(send, 5000.0 + f64::from(i) * arrival_step) {
                    det.update(d);
                    over |= det.usage == Usage::Over;
                }
            }
            assert_eq!(over, expect_over, "arrival step {arrival_step}");
        }
    }

    #[test]
    fn burst_packets_form_one_group() {
        let mut ia = InterArrival::default();
        // Three packets within 5 ms of send time, then the next group.
        assert!(ia.add(0.0, 100.0).is_none());
        assert!(ia.add(2.0, 103.0).is_none());
        assert!(ia.add(4.0, 105.0).is_none());
        assert!(
            ia.add(20.0, 121.0).is_none(),
            "first delta needs two groups"
        );
        let d = ia.add(40.0, 141.0).unwrap();
        assert_eq!(d.send_delta, 16.0, "last send of group 2 minus group 1's");
        assert_eq!(d.arrival_delta, 16.0);
    }

    #[test]
    fn unwrap_near_table() {
        let cases = [
            (70_000u64, 4464u16, 70_000u64),
            (70_000, 4460, 69_996),
            (65_535, 0, 65_536),
            (65_536, 65_535, 65_535),
            (131_071, 1, 131_073),
        ];
        for (reference, seq, expected) in cases {
            assert_eq!(unwrap_near(reference, seq), expected, "{reference} {seq}");
        }
    }
}
