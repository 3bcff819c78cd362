//! Runs a scenario: schedules joins, closes each second into the timeline, watches for the end
//! (time up, capacity limit crossed, or a failure that makes going on pointless) and builds the
//! report. Every wait is bounded, so a run always ends and always leaves a report.

use crate::participant::{self, Context, Spec};
use crate::report::{CapacityStep, Report, Second, ServerSample, StepLoad};
use crate::scenario::{Mode, Scenario};
use crate::server_metrics::Residence;
use crate::signaling::{self, ServerKind, Target, TokenSource};
use crate::stats::{Collector, Hist, Shared};
use edge_node::transport::dtls::DtlsCertificate;
use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// After this long with subscribers connected and no packet received, the server is gone.
const NO_MEDIA_LIMIT: Duration = Duration::from_secs(5);
/// How long stopping participants may take before they are cut off.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Settings of a run besides the scenario.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub target: String,
    pub tokens: TokenSource,
    pub media_via: Option<SocketAddr>,
    pub server_pid: Option<u32>,
    pub progress: bool,
    /// Participants' identities start with this (default `lt`).
    pub identity_prefix: String,
}

/// What the per-second loop decides.
enum Verdict {
    Continue,
    Done,
    Abort(String),
}

/// Server CPU and memory from /proc (Linux), sampled once a second; also how long the
/// process's threads were runnable but waiting for a CPU (`schedstat`), because on a shared
/// machine a server or a load tester that waits for the CPU more than it runs measures the
/// machine, not itself.
struct ProcSampler {
    pid: u32,
    last: Option<(Instant, u64)>,
    last_wait_ns: Option<u64>,
    ticks_per_sec: f64,
}

impl ProcSampler {
    fn new(pid: u32) -> Self {
        Self {
            pid,
            last: None,
            last_wait_ns: None,
            ticks_per_sec: clock_ticks(),
        }
    }

    fn sample(&mut self) -> Option<ServerSample> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        // Fields after the command name (which may hold spaces) start after the last ')'.
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let rss_kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        let now = Instant::now();
        let wait_ns = run_queue_wait_ns(self.pid);
        let secs = self
            .last
            .map(|(t, _)| now.duration_since(t).as_secs_f64().max(1e-3));
        let cpu = self.last.zip(secs).map(|((_, prev), secs)| {
            (ticks.saturating_sub(prev)) as f64 / self.ticks_per_sec / secs * 100.0
        });
        let cpu_wait = match (wait_ns, self.last_wait_ns, secs) {
            (Some(w), Some(prev), Some(secs)) => {
                Some(w.saturating_sub(prev) as f64 / 1e9 / secs * 100.0)
            }
            _ => None,
        };
        self.last = Some((now, ticks));
        self.last_wait_ns = wait_ns;
        Some(ServerSample {
            cpu_pct: cpu,
            cpu_wait_pct: cpu_wait,
            rss_mb: rss_kb as f64 / 1024.0,
        })
    }
}

/// Nanoseconds the process's threads have spent runnable, waiting for a CPU: the second field
/// of `/proc/<pid>/task/<tid>/schedstat`, summed (threads that ended are not counted).
fn run_queue_wait_ns(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0u64;
    for t in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("schedstat")) else {
            continue;
        };
        total += stat
            .split_whitespace()
            .nth(1)
            .and_then(|w| w.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(total)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Runs the scenario against the target and returns the report (also when it failed).
pub async fn run(scenario: Scenario, cfg: RunConfig) -> Report {
    let started = Instant::now();
    let mut report = Report::new(&scenario, &cfg.target, cfg.server_pid);
    let target = match Target::parse(&cfg.target) {
        Ok(t) => t,
        Err(e) => {
            report.abort(e);
            return report;
        }
    };
    // Preflight: is anything there (and, for Janus, does it accept us and is the room there)?
    let mut janus_room = 0;
    match target.kind {
        ServerKind::Kcs => match signaling::http(&target, "GET", "/healthz", &[], "").await {
            Ok((200, _, _)) => {}
            Ok((status, _, body)) => {
                report.abort(format!(
                    "{}/healthz answered {status}: {}",
                    target.base,
                    body.trim()
                ));
                return report;
            }
            Err(e) => {
                report.abort(e.to_string());
                return report;
            }
        },
        ServerKind::Janus => {
            if scenario.mode == Mode::Whip {
                report.abort(
                    "Janus targets speak the VideoRoom API: --mode whip is for the edge".into(),
                );
                return report;
            }
            let secret = match &cfg.tokens {
                TokenSource::Fixed(t) => Some(t.clone()),
                TokenSource::Dev | TokenSource::ControlPlane { .. } => None,
            };
            // Every participant joins as a publisher (see crate::janus): room for all.
            let max = scenario.participants() + 8;
            match crate::janus::prepare_room(&target, secret, &scenario.room, max).await {
                Ok(id) => janus_room = id,
                Err(e) => {
                    report.abort(e.to_string());
                    return report;
                }
            }
        }
    }
    edge_node::transport::install_crypto_provider();
    let cert = match DtlsCertificate::generate() {
        Ok(c) => c,
        Err(e) => {
            report.abort(format!("DTLS certificate: {e}"));
            return report;
        }
    };
    let pacer = match participant::Pacer::start() {
        Ok(p) => p,
        Err(e) => {
            report.abort(format!("starting the publishers' pacing thread: {e}"));
            return report;
        }
    };
    let collector: Shared = Arc::new(Mutex::new(Collector::default()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let local_ip: IpAddr = if target.addr.ip().is_loopback() {
        target.addr.ip()
    } else {
        IpAddr::from([0, 0, 0, 0])
    };
    let ctx = Arc::new(Context {
        target: target.clone(),
        tokens: cfg.tokens.clone(),
        cert,
        collector: collector.clone(),
        ticker: crate::peer::Ticker::start(),
        hub: if local_ip.is_loopback() {
            crate::peer::Hub::start(tokio::runtime::Handle::current().metrics().num_workers()).ok()
        } else {
            None
        },
        pacer,
        media_via: cfg.media_via,
        local_ip,
        room: scenario.room.clone(),
        identity_prefix: cfg.identity_prefix.clone(),
        janus_room,
        mode: scenario.mode,
        nack: scenario.nack,
        stop: stop_rx,
    });

    // Join schedule: (when, spec), sorted. A capacity group joins step by step instead.
    let mut schedule: Vec<(Duration, Spec)> = Vec::new();
    let mut index = 0u32;
    let cap_group = scenario.capacity.as_ref().map(|c| c.group.clone());
    let mut cap_specs: Vec<Spec> = Vec::new();
    for g in &scenario.groups {
        for i in 0..g.count {
            let spec = Spec {
                index,
                group: g.name.clone(),
                publish: g.publish,
                subscribe: g.subscribe,
                max_layer: g.max_layer,
                max_layer_changes: None,
            };
            index += 1;
            if cap_group.as_deref() == Some(g.name.as_str()) {
                cap_specs.push(spec);
                continue;
            }
            let offset = if g.join_rate > 0.0 {
                Duration::from_secs_f64(f64::from(i) / g.join_rate)
            } else {
                Duration::ZERO
            };
            schedule.push((g.start + offset, spec));
        }
    }
    // In WHIP mode viewers watch the latest publisher: publishers go first.
    if scenario.mode == Mode::Whip {
        schedule.sort_by_key(|(t, s)| (s.publish == crate::scenario::Publish::None, *t));
    } else {
        schedule.sort_by_key(|(t, _)| *t);
    }
    let last_join = schedule.last().map_or(Duration::ZERO, |(t, _)| *t);
    let cap_start = scenario
        .groups
        .iter()
        .find(|g| Some(&g.name) == cap_group.as_ref())
        .map_or(Duration::ZERO, |g| g.start);

    let mut tasks: JoinSet<(u32, Result<(), participant::ParticipantError>)> = JoinSet::new();
    let mut next_join = 0usize;
    let mut server = cfg.server_pid.map(ProcSampler::new);
    let mut tool = ProcSampler::new(std::process::id());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let progress = make_progress(cfg.progress, scenario.participants());
    let tty = std::io::stderr().is_terminal();
    let mut no_media_since: Option<Instant> = None;
    let mut ever_connected = false;
    let mut fatal_failures = 0u32;
    let mut started_count = 0u32;
    // Capacity state.
    let mut cap_joined = 0usize;
    let mut cap_step_started: Option<Instant> = None;
    let mut cap_step_hist = Hist::default();
    let mut cap_step_expected = 0u64;
    let mut cap_step_lost = 0u64;
    let mut cap_step_failed_at_start = 0usize;
    let mut cap_step_load = StepLoad::default();
    // The tool's own send and receive lag over the step's measured part.
    let mut cap_step_send_lag = Hist::default();
    let mut cap_step_read_lag = Hist::default();
    // The edge's residence histogram when a capacity step's measured part began, and when the
    // joins were done (see crate::server_metrics).
    let mut cap_step_residence: Option<Residence> = None;
    let mut run_residence: Option<Residence> = None;
    let media_end: Option<Instant> = None;
    let mut media_end = media_end;
    let hard_limit = started
        + last_join
        + scenario.duration
        + scenario.capacity.as_ref().map_or(Duration::ZERO, |c| {
            c.step_duration * (cap_specs.len() as u32).div_ceil(c.step.max(1)) + cap_start
        })
        + Duration::from_secs(60);

    let verdict = loop {
        // Joins due now.
        let elapsed = started.elapsed();
        while next_join < schedule.len() && schedule[next_join].0 <= elapsed {
            let spec = schedule[next_join].1.clone();
            next_join += 1;
            started_count += 1;
            let ctx = ctx.clone();
            tasks.spawn(async move { (spec.index, participant::run(ctx, spec).await) });
        }
        if let Some(cap) = &scenario.capacity {
            let step_due = cap_step_started.is_none_or(|t| t.elapsed() >= cap.step_duration);
            if elapsed >= cap_start && step_due && next_join >= schedule.len() {
                // Close the finished step.
                if let Some(t) = cap_step_started {
                    let failed_now = collector.lock().expect("collector lock").failed;
                    let loss = if cap_step_expected == 0 {
                        0.0
                    } else {
                        cap_step_lost as f64 / cap_step_expected as f64
                    };
                    let p99 = cap_step_hist.quantile(0.99).map(|us| us as f64 / 1000.0);
                    let send_lag = cap_step_send_lag
                        .quantile(0.99)
                        .map(|us| us as f64 / 1000.0);
                    let read_lag = cap_step_read_lag
                        .quantile(0.99)
                        .map(|us| us as f64 / 1000.0);
                    let pass = loss <= cap.max_loss
                        && p99.is_some_and(|p| p <= cap.max_p99_ms)
                        && failed_now == cap_step_failed_at_start;
                    let edge_residence = match cap_step_residence.take() {
                        Some(at_settle) => Residence::scrape(&target)
                            .await
                            .and_then(|r| r.since(&at_settle)),
                        None => None,
                    };
                    report.capacity_steps.push(CapacityStep {
                        viewers: cap_joined,
                        seconds: t.elapsed().as_secs_f64(),
                        loss,
                        p99_ms: p99,
                        failures: failed_now - cap_step_failed_at_start,
                        pass,
                        edge_residence,
                        rx_packets_per_s: cap_step_load.rx_packets_per_s(),
                        server_cpu_pct: cap_step_load.server_cpu_pct(),
                        fanout_span_ms: cap_step_load.fanout_span_ms(cap_joined),
                        tool_cpu_pct: cap_step_load.tool_cpu_pct(),
                        tool_headroom: cap_step_load.tool_headroom(),
                        tool_send_lag_p99_ms: send_lag,
                        tool_receive_lag_p99_ms: read_lag,
                        tool_kept_up: crate::report::kept_up(send_lag, read_lag),
                    });
                    if !pass {
                        break Verdict::Done;
                    }
                }
                if cap_joined >= cap_specs.len() {
                    break Verdict::Done;
                }
                let n = (cap.step as usize).min(cap_specs.len() - cap_joined);
                for spec in &cap_specs[cap_joined..cap_joined + n] {
                    let ctx = ctx.clone();
                    let spec = spec.clone();
                    started_count += 1;
                    tasks.spawn(async move { (spec.index, participant::run(ctx, spec).await) });
                }
                cap_joined += n;
                cap_step_started = Some(Instant::now());
                cap_step_hist = Hist::default();
                cap_step_expected = 0;
                cap_step_lost = 0;
                cap_step_load = StepLoad::default();
                cap_step_send_lag = Hist::default();
                cap_step_read_lag = Hist::default();
                cap_step_failed_at_start = collector.lock().expect("collector lock").failed;
            }
        } else if next_join >= schedule.len() && media_end.is_none() {
            media_end = Some(Instant::now() + scenario.duration);
            if target.kind == ServerKind::Kcs {
                run_residence = Residence::scrape(&target).await;
            }
        }

        tokio::select! {
            _ = tick.tick() => {}
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Ok((index, Err(e))) = done {
                    if e.is_fatal() {
                        fatal_failures += 1;
                    }
                    collector.lock().expect("collector lock").fail(format!("participant {index}: {e}"));
                }
                continue;
            }
        }

        // Close one second.
        let t = started.elapsed().as_secs_f64();
        let server_sample = server.as_mut().and_then(ProcSampler::sample);
        let tool_sample = tool.sample();
        let (second, connected, failed, delay_s) = {
            let mut c = collector.lock().expect("collector lock");
            let s = std::mem::take(&mut c.second);
            let d = c.close_delay_second();
            let lag = std::mem::take(&mut c.lag_second);
            let read_lag = std::mem::take(&mut c.read_lag_second);
            let sec = Second::from_parts(t, c.connected, &s, &d, &lag, server_sample, tool_sample);
            (sec, c.connected, c.failed, (d, s, lag, read_lag))
        };
        let settle = scenario.capacity.as_ref().map_or(Duration::ZERO, |c| {
            Duration::from_millis(1500).max(c.step_duration / 2)
        });
        if scenario.capacity.is_some() && cap_step_started.is_some_and(|st| st.elapsed() > settle) {
            // Skip the start of a step (1.5 s, or half the step when longer): the step's joins
            // (a burst of ICE and DTLS handshakes on the tool's few threads) and the keyframes
            // they ask for settle. Steady forwarding is what the step measures.
            if cap_step_residence.is_none() && target.kind == ServerKind::Kcs {
                cap_step_residence = Residence::scrape(&target).await;
            }
            cap_step_hist.merge(&delay_s.0);
            cap_step_expected += delay_s.1.expected;
            cap_step_lost += delay_s.1.net_lost();
            cap_step_load.add(&second);
            cap_step_send_lag.merge(&delay_s.2);
            cap_step_read_lag.merge(&delay_s.3);
        }
        ever_connected |= connected > 0;
        let expecting_media = connected > 0 && scenario.groups.iter().any(|g| g.subscribe);
        if expecting_media && second.rx_packets == 0 && t > 3.0 {
            no_media_since.get_or_insert(Instant::now());
        } else {
            no_media_since = None;
        }
        show_progress(
            &progress,
            tty,
            &second,
            started_count,
            scenario.participants(),
            failed,
        );
        report.timeline.push(second);

        if fatal_failures > 0 && connected == 0 && fatal_failures as usize >= failed.max(1) {
            let first = collector
                .lock()
                .expect("collector lock")
                .failures
                .first()
                .cloned();
            break Verdict::Abort(first.unwrap_or_else(|| "participants refused".into()));
        }
        if ever_connected && connected == 0 && failed > 0 {
            let first = collector
                .lock()
                .expect("collector lock")
                .failures
                .first()
                .cloned();
            break Verdict::Abort(format!(
                "every participant lost its connection (server stopped?): {}",
                first.unwrap_or_default()
            ));
        }
        if let Some(since) = no_media_since {
            if since.elapsed() >= NO_MEDIA_LIMIT {
                break Verdict::Abort(format!(
                    "no media received for {NO_MEDIA_LIMIT:?} with {connected} participants connected (server stopped forwarding?)"
                ));
            }
        }
        if Instant::now() >= hard_limit {
            break Verdict::Abort("the run exceeded its time limit".into());
        }
        if started_count as usize == schedule.len() + cap_specs.len()
            && tasks.is_empty()
            && failed >= started_count as usize
        {
            let first = collector
                .lock()
                .expect("collector lock")
                .failures
                .first()
                .cloned();
            break Verdict::Abort(format!(
                "every participant failed: {}",
                first.unwrap_or_default()
            ));
        }
        if media_end.is_some_and(|e| Instant::now() >= e) {
            break Verdict::Done;
        }
        let _ = Verdict::Continue;
    };

    // Stop everyone, bounded.
    let _ = stop_tx.send(true);
    let deadline = tokio::time::Instant::now() + STOP_GRACE;
    while !tasks.is_empty() {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(Ok((index, Err(e))))) => {
                collector
                    .lock()
                    .expect("collector lock")
                    .fail(format!("participant {index}: {e}"));
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                tasks.abort_all();
                break;
            }
        }
    }
    if let Some(start) = &run_residence {
        report.edge_residence = Residence::scrape(&target)
            .await
            .and_then(|r| r.since(start));
    }
    if let Some(p) = &progress {
        p.finish_and_clear();
    }
    if let Verdict::Abort(why) = verdict {
        report.abort(why);
    }
    report.finish(
        &collector.lock().expect("collector lock"),
        started.elapsed(),
        schedule.len() + cap_specs.len(),
    );
    report
}

fn make_progress(enabled: bool, total: u32) -> Option<indicatif::ProgressBar> {
    if !enabled || !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = indicatif::ProgressBar::new(u64::from(total));
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] joined {pos}/{len} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    Some(pb)
}

fn show_progress(
    pb: &Option<indicatif::ProgressBar>,
    tty: bool,
    s: &Second,
    started: u32,
    total: u32,
    failed: usize,
) {
    let msg = format!(
        "connected {} failed {} | rx {} pkt/s loss {:.2}% delay p50 {} p99 {} | send lag max {}",
        s.connected,
        failed,
        s.rx_packets,
        s.loss * 100.0,
        fmt_ms(s.delay_p50_ms),
        fmt_ms(s.delay_p99_ms),
        fmt_ms(s.send_lag_max_ms),
    );
    match pb {
        Some(pb) => {
            pb.set_position(u64::from(started));
            pb.set_message(msg);
        }
        None if !tty && (s.t.round() as u64).is_multiple_of(5) => {
            eprintln!("[{:>4.0}s] joined {started}/{total} {msg}", s.t);
        }
        None => {}
    }
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}ms"))
}
