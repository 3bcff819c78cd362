//! The run's report: JSON for machines, one self-contained HTML page (inline SVG, no scripts
//! from anywhere) for people, and a short text summary for the terminal.

use crate::scenario::Scenario;
use crate::server_metrics::ResidenceSummary;
use crate::stats::{Collector, Counters, Hist, Summary};
use serde::Serialize;
use std::fmt::Write as _;
use std::time::Duration;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct ServerSample {
    pub cpu_pct: Option<f64>,
    /// Time its threads were runnable but waiting for a CPU, in % of wall time.
    pub cpu_wait_pct: Option<f64>,
    pub rss_mb: f64,
}

/// One second of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Second {
    pub t: f64,
    pub connected: usize,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub loss: f64,
    pub delay_p50_ms: Option<f64>,
    pub delay_p99_ms: Option<f64>,
    /// Received bitrate by stream: audio, video layer 0, 1, 2, screen.
    pub rx_kbps: [f64; 5],
    pub send_lag_max_ms: Option<f64>,
    pub server: Option<ServerSample>,
    pub tool: Option<ServerSample>,
}

impl Second {
    pub fn from_parts(
        t: f64,
        connected: usize,
        c: &Counters,
        delay: &Hist,
        lag: &Hist,
        server: Option<ServerSample>,
        tool: Option<ServerSample>,
    ) -> Self {
        let q = |h: &Hist, p: f64| h.quantile(p).map(|us| us as f64 / 1000.0);
        Self {
            t,
            connected,
            rx_packets: c.rx_packets,
            tx_packets: c.tx_packets,
            loss: c.loss(),
            delay_p50_ms: q(delay, 0.5),
            delay_p99_ms: q(delay, 0.99),
            rx_kbps: c.rx_bytes.map(|b| b as f64 * 8.0 / 1000.0),
            send_lag_max_ms: lag.summary_ms().map(|s| s.max),
            server,
            tool,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CapacityStep {
    pub viewers: usize,
    pub seconds: f64,
    pub loss: f64,
    pub p99_ms: Option<f64>,
    pub failures: usize,
    pub pass: bool,
    /// The edge's own delay over the step's measured part (its `/metrics`), when it has one.
    pub edge_residence: Option<ResidenceSummary>,
    /// Packets the viewers received per second over the step's measured part.
    pub rx_packets_per_s: f64,
    /// The server's mean CPU over the step's measured part, in % of one core (with `--server-pid`).
    pub server_cpu_pct: Option<f64>,
    /// How long the server's CPU takes to hand one packet to every viewer: viewers × its CPU time
    /// per delivered packet. On one core the last viewer's copy of a packet cannot leave sooner,
    /// so this is the floor under the server's own delay at this step (see [`StepLoad`]).
    pub fanout_span_ms: Option<f64>,
    /// The load tester's own mean CPU over the step's measured part, in % of one core.
    pub tool_cpu_pct: Option<f64>,
    /// How many times this step's load one core of the tool could drive, over how many times
    /// one core of the server could serve it: the server's CPU over the tool's for the same
    /// packets. At 2 the tool drives twice the load that saturates a server core.
    pub tool_headroom: Option<f64>,
    /// The tool's own send and receive lag over the step's measured part (p99, ms), and whether
    /// both stayed within the limit the run's verdict uses: a step the tool did not keep up
    /// with measured the tool as well as the server. The joins before it (a burst of
    /// handshakes on the tool's few threads) are not in it; the run's figures are.
    pub tool_send_lag_p99_ms: Option<f64>,
    pub tool_receive_lag_p99_ms: Option<f64>,
    pub tool_kept_up: Option<bool>,
}

/// What a capacity step's measured seconds cost the server, for [`CapacityStep::fanout_span_ms`].
///
/// Why: at a fixed utilisation U of one core, a packet to V viewers costs V × c of CPU, and
/// V × r × c = U when each viewer receives r packets/s, so its last copy leaves U / r after its
/// first whatever the per-copy cost c. That floor, measured, says how much of the server's p99 is
/// the fan-out itself and how much is queueing.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepLoad {
    seconds: u32,
    rx_packets: u64,
    cpu_pct_sum: f64,
    cpu_seconds: u32,
    tool_cpu_pct_sum: f64,
    tool_cpu_seconds: u32,
}

impl StepLoad {
    /// Adds one measured second.
    pub fn add(&mut self, second: &Second) {
        self.seconds += 1;
        self.rx_packets += second.rx_packets;
        if let Some(cpu) = second.server.as_ref().and_then(|s| s.cpu_pct) {
            self.cpu_pct_sum += cpu;
            self.cpu_seconds += 1;
        }
        if let Some(cpu) = second.tool.as_ref().and_then(|s| s.cpu_pct) {
            self.tool_cpu_pct_sum += cpu;
            self.tool_cpu_seconds += 1;
        }
    }

    pub fn tool_cpu_pct(&self) -> Option<f64> {
        (self.tool_cpu_seconds > 0)
            .then(|| self.tool_cpu_pct_sum / f64::from(self.tool_cpu_seconds))
    }

    /// The server's CPU over the tool's for the same packets (see
    /// [`CapacityStep::tool_headroom`]).
    pub fn tool_headroom(&self) -> Option<f64> {
        let tool = self.tool_cpu_pct().filter(|c| *c > 0.0)?;
        Some(self.server_cpu_pct()? / tool)
    }

    pub fn rx_packets_per_s(&self) -> f64 {
        if self.seconds == 0 {
            return 0.0;
        }
        self.rx_packets as f64 / f64::from(self.seconds)
    }

    pub fn server_cpu_pct(&self) -> Option<f64> {
        (self.cpu_seconds > 0).then(|| self.cpu_pct_sum / f64::from(self.cpu_seconds))
    }

    /// Viewers × the server's CPU seconds per delivered packet, in ms.
    pub fn fanout_span_ms(&self, viewers: usize) -> Option<f64> {
        let pps = self.rx_packets_per_s();
        let cpu = self.server_cpu_pct()?;
        (pps > 0.0).then(|| viewers as f64 * (cpu / 100.0) / pps * 1000.0)
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct JoinReport {
    pub signaling: Option<Summary>,
    pub ice: Option<Summary>,
    pub dtls: Option<Summary>,
    pub first_media: Option<Summary>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct ResourceReport {
    pub pid: Option<u32>,
    pub cpu_avg_pct: Option<f64>,
    pub cpu_max_pct: Option<f64>,
    /// Mean time its threads waited for a CPU while runnable, in % of wall time.
    pub cpu_wait_avg_pct: Option<f64>,
    pub rss_max_mb: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: Scenario,
    pub target: String,
    /// "completed" or "aborted".
    pub outcome: String,
    /// Why the run was aborted.
    pub error: Option<String>,
    pub duration_s: f64,
    pub participants_planned: usize,
    pub participants_joined: usize,
    pub participants_failed: usize,
    pub failures: Vec<String>,
    pub join: JoinReport,
    pub delay: Option<Summary>,
    /// The edge's own share of the delay: how long media stayed in it, from the kernel's
    /// arrival stamp to the hand-off of its copies (`kcs_media_residence_seconds`, scraped when
    /// the joins were done and at the end). `None` for servers without that histogram.
    pub edge_residence: Option<ResidenceSummary>,
    pub jitter: Option<Summary>,
    /// Packets never received / packets expected, over the whole run.
    pub loss: f64,
    /// Mean received bitrate per stream over seconds with media: audio, layer 0..=2, screen.
    pub rx_kbps_mean: [f64; 5],
    pub counters: Counters,
    pub server: ResourceReport,
    pub tool: ResourceReport,
    /// The tool's own lateness in sending media (how far behind schedule a send was).
    pub send_lag: Option<Summary>,
    /// The tool's own lateness in reading media: per read, how long its oldest datagram had
    /// waited in the socket after the kernel received it. Delay and jitter are timed from the
    /// kernel's arrival stamp, so this does not add to them; it delays the feedback the tool
    /// sends (NACK, transport-wide feedback) as a slow browser's would.
    pub receive_lag: Option<Summary>,
    /// Whether the tool kept up: send lag p99 and receive lag p99 under 10 ms (tokio timers
    /// alone add up to 1 ms).
    pub tool_kept_up: Option<bool>,
    pub capacity_steps: Vec<CapacityStep>,
    /// Capacity search result: the most viewers whose step passed.
    pub capacity_viewers: Option<usize>,
    pub timeline: Vec<Second>,
    pub delay_cdf: Vec<(f64, f64)>,
    /// First-media join times (ms) of every participant that got media.
    pub join_first_media_ms: Vec<f64>,
    /// What the WS sessions received (every mode-ws run; the town-hall's main figure).
    pub signaling: Option<SignalingReport>,
}

/// Signaling load and roster convergence over the WS sessions.
#[derive(Debug, Clone, Serialize)]
pub struct SignalingReport {
    pub sessions: usize,
    /// Sessions that neither published nor subscribed.
    pub signaling_only: usize,
    pub events: u64,
    /// Events per session per second of the run.
    pub events_per_session_per_s: f64,
    /// Participants listed in `participant:joined` / `participant:left` per session: the
    /// roster traffic that a large room's counts replace.
    pub entries_per_session: f64,
    /// Room size as each session saw it at the end: min, median, max.
    pub roster_min: u64,
    pub roster_p50: u64,
    pub roster_max: u64,
    /// Participants connected at the end (what a converged roster shows).
    pub roster_expected: usize,
}

/// A histogram bucket's upper bound in ms, or "over the last bucket".
fn fmt_bound(ms: Option<f64>) -> String {
    ms.map_or_else(|| "(beyond 100 ms)".into(), |ms| format!("{ms} ms"))
}

/// Send or receive lag p99 above which the tool says it did not keep up: a frame sent late by
/// more than this distorts the load's shape, feedback read late by more distorts the server's
/// congestion control.
const LAG_LIMIT_MS: f64 = 10.0;

/// Whether the tool kept up, from its send and receive lag p99s (ms): unknown without a send
/// lag (nothing was sent), and a missing receive lag (nothing read) does not count against it.
pub fn kept_up(send_p99_ms: Option<f64>, receive_p99_ms: Option<f64>) -> Option<bool> {
    send_p99_ms.map(|s| s <= LAG_LIMIT_MS && receive_p99_ms.is_none_or(|r| r <= LAG_LIMIT_MS))
}

impl Report {
    pub fn new(scenario: &Scenario, target: &str, server_pid: Option<u32>) -> Self {
        Self {
            scenario: scenario.clone(),
            target: target.to_owned(),
            outcome: "completed".into(),
            error: None,
            duration_s: 0.0,
            participants_planned: scenario.participants() as usize,
            participants_joined: 0,
            participants_failed: 0,
            failures: Vec::new(),
            join: JoinReport::default(),
            delay: None,
            edge_residence: None,
            jitter: None,
            loss: 0.0,
            rx_kbps_mean: [0.0; 5],
            counters: Counters::default(),
            server: ResourceReport {
                pid: server_pid,
                ..Default::default()
            },
            tool: ResourceReport {
                pid: Some(std::process::id()),
                ..Default::default()
            },
            send_lag: None,
            receive_lag: None,
            tool_kept_up: None,
            capacity_steps: Vec::new(),
            capacity_viewers: None,
            timeline: Vec::new(),
            delay_cdf: Vec::new(),
            join_first_media_ms: Vec::new(),
            signaling: None,
        }
    }

    pub fn abort(&mut self, why: String) {
        self.outcome = "aborted".into();
        if self.error.is_none() {
            self.error = Some(why);
        }
    }

    pub fn finish(&mut self, c: &Collector, elapsed: Duration, planned: usize) {
        self.duration_s = elapsed.as_secs_f64();
        self.participants_planned = planned;
        self.participants_failed = c.failed;
        self.failures = c.failures.clone();
        let hist = |f: &dyn Fn(&crate::stats::JoinTimes) -> Option<f64>| {
            let mut h = Hist::default();
            for j in &c.joins {
                if let Some(ms) = f(j) {
                    h.record((ms * 1000.0) as u64);
                }
            }
            h.summary_ms()
        };
        self.join = JoinReport {
            // Recorded as joins complete, so participants cut off at the end still count.
            signaling: c
                .join_signaling
                .summary_ms()
                .or_else(|| hist(&|j| j.signaling_ms)),
            ice: hist(&|j| j.ice_ms),
            dtls: hist(&|j| j.dtls_ms),
            first_media: hist(&|j| j.first_media_ms),
        };
        let recorded = c
            .joins
            .iter()
            .filter(|j| j.dtls_ms.is_some() || (j.signaling_only && j.signaling_ms.is_some()))
            .count();
        self.participants_joined = recorded.max(c.joined);
        if !c.roster_views.is_empty() {
            let mut views = c.roster_views.clone();
            views.sort_unstable();
            self.signaling = Some(SignalingReport {
                sessions: views.len(),
                signaling_only: c.joins.iter().filter(|j| j.signaling_only).count(),
                events: c.signaling_events,
                events_per_session_per_s: c.signaling_events as f64
                    / views.len() as f64
                    / self.duration_s.max(1e-3),
                entries_per_session: c.presence_entries as f64 / views.len() as f64,
                roster_min: views[0],
                roster_p50: views[views.len() / 2],
                roster_max: views[views.len() - 1],
                roster_expected: views.len(),
            });
        }
        self.join_first_media_ms = c.joins.iter().filter_map(|j| j.first_media_ms).collect();
        let delay = c.delay_total();
        self.delay = delay.summary_ms();
        self.jitter = c.jitter_total.summary_ms();
        self.delay_cdf = delay.cdf_ms();
        self.counters = c.total;
        self.loss = c.total.loss();
        self.send_lag = c.lag_total.summary_ms();
        self.receive_lag = c.read_lag_total.summary_ms();
        self.tool_kept_up = kept_up(
            self.send_lag.map(|s| s.p99),
            self.receive_lag.map(|r| r.p99),
        );
        let media: Vec<&Second> = self.timeline.iter().filter(|s| s.rx_packets > 0).collect();
        if !media.is_empty() {
            for i in 0..5 {
                self.rx_kbps_mean[i] =
                    media.iter().map(|s| s.rx_kbps[i]).sum::<f64>() / media.len() as f64;
            }
        }
        self.server.cpu_avg_pct = mean(self.timeline.iter().filter_map(|s| s.server?.cpu_pct));
        self.server.cpu_max_pct = max(self.timeline.iter().filter_map(|s| s.server?.cpu_pct));
        self.server.cpu_wait_avg_pct =
            mean(self.timeline.iter().filter_map(|s| s.server?.cpu_wait_pct));
        self.tool.cpu_wait_avg_pct =
            mean(self.timeline.iter().filter_map(|s| s.tool?.cpu_wait_pct));
        self.server.rss_max_mb = max(self
            .timeline
            .iter()
            .filter_map(|s| s.server.map(|x| x.rss_mb)));
        self.tool.cpu_avg_pct = mean(self.timeline.iter().filter_map(|s| s.tool?.cpu_pct));
        self.tool.cpu_max_pct = max(self.timeline.iter().filter_map(|s| s.tool?.cpu_pct));
        self.tool.rss_max_mb = max(self
            .timeline
            .iter()
            .filter_map(|s| s.tool.map(|x| x.rss_mb)));
        if !self.capacity_steps.is_empty() {
            self.capacity_viewers = Some(
                self.capacity_steps
                    .iter()
                    .take_while(|s| s.pass)
                    .last()
                    .map_or(0, |s| s.viewers),
            );
        }
    }

    /// A few lines for the terminal.
    /// Said when the server or the tool waited for a CPU at least half as long as it ran:
    /// other processes on the machine were taking its time, so delays and capacities measure
    /// the machine.
    pub fn contention_warning(&self) -> Option<String> {
        let busy = |r: &ResourceReport, who: &str| {
            let (cpu, wait) = (r.cpu_avg_pct?, r.cpu_wait_avg_pct?);
            (wait >= 5.0 && wait * 2.0 >= cpu).then(|| {
                format!("{who} waited for a CPU {wait:.0}% of the time while using {cpu:.0}%")
            })
        };
        let found: Vec<String> = [busy(&self.server, "server"), busy(&self.tool, "tool")]
            .into_iter()
            .flatten()
            .collect();
        (!found.is_empty()).then(|| {
            format!(
                "CPU CONTENTION: {}; other processes took its time, delays and capacity are upper bounds",
                found.join(", ")
            )
        })
    }

    pub fn summary(&self) -> String {
        let mut s = String::new();
        let f = |v: &Option<Summary>| {
            v.map_or("-".to_owned(), |v| {
                format!(
                    "p50 {:.1} / p95 {:.1} / p99 {:.1} / max {:.1} ms",
                    v.p50, v.p95, v.p99, v.max
                )
            })
        };
        let _ = writeln!(
            s,
            "scenario {} against {}: {} in {:.1} s",
            self.scenario.name, self.target, self.outcome, self.duration_s
        );
        if let Some(e) = &self.error {
            let _ = writeln!(s, "  error: {e}");
        }
        let _ = writeln!(
            s,
            "  participants: {} planned, {} connected, {} failed",
            self.participants_planned, self.participants_joined, self.participants_failed
        );
        let _ = writeln!(s, "  join signaling  {}", f(&self.join.signaling));
        if let Some(g) = &self.signaling {
            let _ = writeln!(
                s,
                "  signaling: {} sessions ({} signaling-only), {} events, {:.2} per session per s, {:.1} presence entries per session; roster seen min {} / p50 {} / max {} of {}",
                g.sessions, g.signaling_only, g.events, g.events_per_session_per_s, g.entries_per_session,
                g.roster_min, g.roster_p50, g.roster_max, g.roster_expected
            );
        }
        let _ = writeln!(s, "  join ICE        {}", f(&self.join.ice));
        let _ = writeln!(s, "  join DTLS       {}", f(&self.join.dtls));
        let _ = writeln!(s, "  first media     {}", f(&self.join.first_media));
        let _ = writeln!(s, "  one-way delay   {}", f(&self.delay));
        if let Some(r) = &self.edge_residence {
            let _ = writeln!(
                s,
                "  edge's own share (kernel arrival to hand-off of the copies, {} packets): p50 <= {} p99 <= {}",
                r.packets,
                fmt_bound(r.p50_ms),
                fmt_bound(r.p99_ms)
            );
        }
        let _ = writeln!(s, "  jitter          {}", f(&self.jitter));
        let _ = writeln!(
            s,
            "  loss {:.3}% ({} of {} packets), {} duplicates, {} reordered, {} recovered by NACK",
            self.loss * 100.0,
            self.counters.net_lost(),
            self.counters.expected,
            self.counters.duplicates,
            self.counters.reordered,
            self.counters.recovered
        );
        let k = self.rx_kbps_mean;
        let _ = writeln!(
            s,
            "  received kbit/s: audio {:.0}, layer0 {:.0}, layer1 {:.0}, layer2 {:.0}, screen {:.0}; {} layer switches",
            k[0], k[1], k[2], k[3], k[4], self.counters.layer_switches
        );
        if self.server.pid.is_some() {
            let _ = writeln!(
                s,
                "  server CPU avg {} max {}, waiting for a CPU {}, RSS max {}",
                pct(self.server.cpu_avg_pct),
                pct(self.server.cpu_max_pct),
                pct(self.server.cpu_wait_avg_pct),
                mb(self.server.rss_max_mb)
            );
        }
        let _ = writeln!(
            s,
            "  tool CPU avg {}, waiting for a CPU {}, send lag {}, receive lag {}{}",
            pct(self.tool.cpu_avg_pct),
            pct(self.tool.cpu_wait_avg_pct),
            f(&self.send_lag),
            f(&self.receive_lag),
            match self.tool_kept_up {
                Some(false) => "  (THE TOOL DID NOT KEEP UP: figures are pessimistic)",
                _ => "",
            }
        );
        if let Some(w) = self.contention_warning() {
            let _ = writeln!(s, "  {w}");
        }
        if let Some(v) = self.capacity_viewers {
            let _ = writeln!(
                s,
                "  capacity: {v} viewers passed (loss <= {:.1}%, p99 <= {:.0} ms)",
                self.scenario
                    .capacity
                    .as_ref()
                    .map_or(0.0, |c| c.max_loss * 100.0),
                self.scenario
                    .capacity
                    .as_ref()
                    .map_or(0.0, |c| c.max_p99_ms)
            );
            let behind: Vec<String> = self
                .capacity_steps
                .iter()
                .filter(|st| st.tool_kept_up == Some(false))
                .map(|st| st.viewers.to_string())
                .collect();
            let _ = writeln!(
                s,
                "  {}",
                if behind.is_empty() {
                    "the tool kept up in every step's measured part".to_string()
                } else {
                    format!(
                        "the tool did not keep up in the measured part of the steps at {} viewers: they measured the tool as well",
                        behind.join(", ")
                    )
                }
            );
        }
        s
    }

    pub fn html(&self) -> String {
        let mut h = String::new();
        let json = serde_json::to_string_pretty(self).unwrap_or_default();
        let _ = write!(
            h,
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>loadtest: {name}</title>\
<style>body{{font-family:sans-serif;margin:2em;max-width:1000px}}pre{{background:#f4f4f4;padding:1em;overflow:auto}}\
svg{{background:#fafafa;border:1px solid #ddd;margin:.5em 0}}h2{{margin-top:1.5em}}</style></head><body>\
<h1>loadtest: {name}</h1><pre>{summary}</pre>",
            name = esc(&self.scenario.name),
            summary = esc(&self.summary())
        );
        h.push_str("<h2>One-way delay, cumulative distribution</h2>");
        h.push_str(&line_chart(
            &[("delay", "#1f77b4", self.delay_cdf.clone())],
            "ms",
            "fraction",
        ));
        let series = |i: usize| -> Vec<(f64, f64)> {
            self.timeline.iter().map(|s| (s.t, s.rx_kbps[i])).collect()
        };
        h.push_str("<h2>Received bitrate over time (kbit/s, all receivers)</h2>");
        h.push_str(&line_chart(
            &[
                ("audio", "#2ca02c", series(0)),
                ("layer 0", "#1f77b4", series(1)),
                ("layer 1", "#ff7f0e", series(2)),
                ("layer 2", "#d62728", series(3)),
                ("screen", "#9467bd", series(4)),
            ],
            "s",
            "kbit/s",
        ));
        h.push_str("<h2>Loss and delay p99 over time</h2>");
        h.push_str(&line_chart(
            &[(
                "loss %",
                "#d62728",
                self.timeline
                    .iter()
                    .map(|s| (s.t, s.loss * 100.0))
                    .collect(),
            )],
            "s",
            "%",
        ));
        h.push_str(&line_chart(
            &[(
                "delay p99 ms",
                "#1f77b4",
                self.timeline
                    .iter()
                    .filter_map(|s| Some((s.t, s.delay_p99_ms?)))
                    .collect(),
            )],
            "s",
            "ms",
        ));
        h.push_str("<h2>Join to first media (histogram)</h2>");
        h.push_str(&histogram(&self.join_first_media_ms, "ms"));
        if self.server.pid.is_some() {
            h.push_str("<h2>Server CPU % and RSS MB</h2>");
            h.push_str(&line_chart(
                &[
                    (
                        "cpu %",
                        "#8c564b",
                        self.timeline
                            .iter()
                            .filter_map(|s| Some((s.t, s.server?.cpu_pct?)))
                            .collect(),
                    ),
                    (
                        "rss MB",
                        "#7f7f7f",
                        self.timeline
                            .iter()
                            .filter_map(|s| Some((s.t, s.server?.rss_mb)))
                            .collect(),
                    ),
                ],
                "s",
                "",
            ));
        }
        let _ = write!(
            h,
            "<h2>Report (JSON)</h2><pre>{}</pre></body></html>",
            esc(&json)
        );
        h
    }
}

fn mean(it: impl Iterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = it.collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn max(it: impl Iterator<Item = f64>) -> Option<f64> {
    it.fold(None, |m, x| Some(m.map_or(x, |m: f64| m.max(x))))
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0}%"))
}

fn mb(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1} MB"))
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

const W: f64 = 900.0;
const H: f64 = 260.0;
const PAD: f64 = 50.0;

/// An inline SVG line chart of several series sharing axes.
/// (name, colour, points) of one line.
type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

fn line_chart(series: &[Series<'_>], xunit: &str, yunit: &str) -> String {
    let pts = series.iter().flat_map(|s| s.2.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0f64);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\">");
    if x0 > x1 {
        s.push_str("<text x=\"20\" y=\"30\">no data</text></svg>");
        return s;
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    if y1 <= 0.0 {
        y1 = 1.0;
    }
    let sx = |x: f64| PAD + (x - x0) / (x1 - x0) * (W - 2.0 * PAD);
    let sy = |y: f64| H - PAD + -(y / y1) * (H - 2.0 * PAD);
    let _ = write!(
        s,
        "<line x1=\"{PAD}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"#333\"/><line x1=\"{PAD}\" y1=\"{PAD}\" x2=\"{PAD}\" y2=\"{b}\" stroke=\"#333\"/>\
<text x=\"{PAD}\" y=\"{lb}\" font-size=\"11\">{x0:.1} {xunit}</text><text x=\"{r}\" y=\"{lb}\" font-size=\"11\" text-anchor=\"end\">{x1:.1} {xunit}</text>\
<text x=\"4\" y=\"{PAD}\" font-size=\"11\">{y1:.1} {yunit}</text><text x=\"4\" y=\"{b}\" font-size=\"11\">0</text>",
        b = H - PAD,
        r = W - PAD,
        lb = H - PAD + 15.0
    );
    for (i, (name, color, data)) in series.iter().enumerate() {
        if data.is_empty() {
            continue;
        }
        let path: Vec<String> = data
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = write!(
            s,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/><text x=\"{}\" y=\"{}\" font-size=\"12\" fill=\"{color}\">{}</text>",
            path.join(" "),
            PAD + 10.0 + 110.0 * i as f64,
            PAD - 10.0,
            esc(name)
        );
    }
    s.push_str("</svg>");
    s
}

/// An inline SVG histogram with 30 bins.
fn histogram(values: &[f64], unit: &str) -> String {
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\">");
    if values.is_empty() {
        s.push_str("<text x=\"20\" y=\"30\">no data</text></svg>");
        return s;
    }
    let lo = values.iter().cloned().fold(f64::MAX, f64::min);
    let hi = values
        .iter()
        .cloned()
        .fold(f64::MIN, f64::max)
        .max(lo + 1.0);
    let bins = 30usize;
    let mut counts = vec![0u32; bins];
    for &v in values {
        let i = (((v - lo) / (hi - lo)) * bins as f64) as usize;
        counts[i.min(bins - 1)] += 1;
    }
    let top = *counts.iter().max().unwrap_or(&1) as f64;
    let bw = (W - 2.0 * PAD) / bins as f64;
    for (i, &c) in counts.iter().enumerate() {
        let h = c as f64 / top * (H - 2.0 * PAD);
        let _ = write!(
            s,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"#1f77b4\"/>",
            PAD + i as f64 * bw,
            H - PAD - h,
            bw - 1.0
        );
    }
    let _ = write!(
        s,
        "<text x=\"{PAD}\" y=\"{y}\" font-size=\"11\">{lo:.0} {unit}</text><text x=\"{r}\" y=\"{y}\" font-size=\"11\" text-anchor=\"end\">{hi:.0} {unit}</text><text x=\"4\" y=\"{PAD}\" font-size=\"11\">{top} joins</text></svg>",
        y = H - PAD + 15.0,
        r = W - PAD
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn second(rx_packets: u64, cpu_pct: Option<f64>) -> Second {
        let mut s = Second::from_parts(
            0.0,
            0,
            &Counters::default(),
            &Hist::default(),
            &Hist::default(),
            cpu_pct.map(|c| ServerSample {
                cpu_pct: Some(c),
                cpu_wait_pct: None,
                rss_mb: 1.0,
            }),
            None,
        );
        s.rx_packets = rx_packets;
        s
    }

    #[test]
    fn fanout_span_is_viewers_times_cpu_per_delivered_packet() {
        let mut load = StepLoad::default();
        assert_eq!(load.fanout_span_ms(100), None);
        // 1,000 viewers at 90 packets/s each with the server at half a core: per second,
        // 90,000 packets cost 0.5 s, so one packet to all 1,000 costs 1,000 × 5.56 µs.
        load.add(&second(90_000, Some(40.0)));
        load.add(&second(90_000, Some(60.0)));
        load.add(&second(90_000, None)); // a second without a CPU sample still counts packets
        assert_eq!(load.rx_packets_per_s(), 90_000.0);
        assert_eq!(load.server_cpu_pct(), Some(50.0));
        let span = load.fanout_span_ms(1_000).unwrap();
        assert!(
            (span - 1_000.0 * 0.5 / 90_000.0 * 1000.0).abs() < 1e-9,
            "{span}"
        );
        // = utilisation / per-viewer rate: 0.5 / 90 s.
        assert!((span - 0.5 / 90.0 * 1000.0).abs() < 1e-9);
        // No server sampling: no span.
        let mut blind = StepLoad::default();
        blind.add(&second(10, None));
        assert_eq!(blind.fanout_span_ms(10), None);
    }

    #[test]
    fn the_tool_kept_up_when_both_its_lags_stay_within_the_limit() {
        assert_eq!(kept_up(Some(3.0), Some(2.0)), Some(true));
        assert_eq!(kept_up(Some(10.0), Some(10.0)), Some(true));
        assert_eq!(kept_up(Some(10.1), Some(1.0)), Some(false), "sent late");
        assert_eq!(kept_up(Some(1.0), Some(12.0)), Some(false), "read late");
        assert_eq!(kept_up(Some(1.0), None), Some(true), "nothing read");
        assert_eq!(kept_up(None, Some(1.0)), None, "nothing sent");
    }

    #[test]
    fn tool_headroom_is_the_servers_cpu_over_the_tools() {
        let with_tool = |server: Option<f64>, tool: Option<f64>| {
            let mut s = second(1_000, server);
            s.tool = tool.map(|c| ServerSample {
                cpu_pct: Some(c),
                cpu_wait_pct: None,
                rss_mb: 1.0,
            });
            s
        };
        let mut load = StepLoad::default();
        load.add(&with_tool(Some(90.0), Some(40.0)));
        load.add(&with_tool(Some(100.0), Some(50.0)));
        load.add(&with_tool(None, None));
        assert_eq!(load.tool_cpu_pct(), Some(45.0));
        // 95% of the server's core against 45% of the tool's: 2.11 times.
        assert!((load.tool_headroom().unwrap() - 95.0 / 45.0).abs() < 1e-9);
        // Unknown without either side's samples.
        let mut no_tool = StepLoad::default();
        no_tool.add(&with_tool(Some(50.0), None));
        assert_eq!(no_tool.tool_headroom(), None);
        let mut no_server = StepLoad::default();
        no_server.add(&with_tool(None, Some(20.0)));
        assert_eq!(no_server.tool_headroom(), None);
    }

    #[test]
    fn html_is_self_contained() {
        let mut r = Report::new(
            &Scenario::conference(2, Duration::from_secs(1)),
            "http://127.0.0.1:1",
            None,
        );
        r.delay_cdf = vec![(1.0, 0.5), (2.0, 1.0)];
        r.join_first_media_ms = vec![100.0, 120.0, 300.0];
        let h = r.html();
        assert!(h.contains("<svg") && h.contains("<polyline") && h.contains("<rect"));
        assert!(!h.contains("<script") && !h.contains("src=\"http"));
    }

    #[test]
    fn contention_is_said_when_waiting_rivals_running() {
        let mut r = Report::new(
            &Scenario::conference(2, Duration::from_secs(1)),
            "http://127.0.0.1:1",
            Some(1),
        );
        r.server.cpu_avg_pct = Some(20.0);
        r.server.cpu_wait_avg_pct = Some(3.0);
        r.tool.cpu_avg_pct = Some(12.0);
        r.tool.cpu_wait_avg_pct = Some(2.0);
        assert_eq!(r.contention_warning(), None);
        assert!(!r.summary().contains("CONTENTION"));
        r.server.cpu_wait_avg_pct = Some(60.0);
        let w = r
            .contention_warning()
            .expect("server waited 3x what it ran");
        assert!(
            w.contains("server waited for a CPU 60%") && !w.contains("tool"),
            "{w}"
        );
        assert!(r.summary().contains("CPU CONTENTION"));
    }
}
