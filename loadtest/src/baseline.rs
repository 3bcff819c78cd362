//! The raw forwarding baseline: the ceiling for forwarding rate per core on this machine.
//!
//! Why: "the edge forwards N packets/s per core" means little alone; the same figure for the
//! least work any SFU must do on the same machine says how much of the core the edge's routing,
//! rewriting, feedback and bookkeeping cost. That least work is: receive SRTP packets in
//! batches (`recvmmsg`), authenticate and decrypt each once, encrypt one copy per receiver with
//! that receiver's own SRTP context, send the copies in batches (`sendmmsg`). No routing table,
//! no header rewriting, no RTCP, no timers.
//!
//! Two threads in one process, each pinned to its own core when asked:
//!
//! - the **forwarder** owns one UDP socket, one inbound SRTP context and `fanout` outbound ones,
//!   and counts what it sent and the CPU time of its own thread;
//! - the **generator** sends the input (the load tester's own packet mix: VP8-shaped 1,500 kbit/s
//!   video with keyframes and Opus-like audio, probes included, SRTP-encrypted) and drains
//!   `fanout` receiver sockets (one address per receiver, as the edge sends to one 5-tuple per
//!   viewer). It keeps a bounded number of input packets ahead of what the forwarder has read
//!   (closed loop) so the forwarder always has work queued without its socket overflowing, and it authenticates a
//!   sample of what arrives (1 of every [`VERIFY_EVERY`] packets) so a broken forwarder cannot
//!   pass as a fast one.
//!
//! The figure is output packets per second of forwarder CPU time (`out_pps_per_core`): with the
//! forwarder saturated it is its wall-clock rate; when the generator cannot feed it (a busy
//! machine) it is still the cost per packet, and the report shows both.
//!
//! The batched socket calls are the edge's own ([`edge_node::udp::batch`]), so the baseline and
//! the edge pay the same per-syscall costs.

use crate::media::{write_rtp, AudioSource, OutExt, RtpHeader, VideoProfile, VideoSource};
use edge_node::sfu::harness::test_keys;
use edge_node::transport::dtls::SrtpProfile;
use edge_node::transport::srtp::SrtpSession;
use edge_node::udp::batch::{send_batch, RecvBatch};
use serde::Serialize;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The generator authenticates one received copy in this many.
pub const VERIFY_EVERY: u64 = 64;
/// Input packets the generator keeps in flight (sent but not yet seen back on every receiver).
const IN_FLIGHT: u64 = 256;
/// Receive buffer asked for every socket: bursts of `fanout` copies must fit.
const SOCKET_BUFFER: libc::c_int = 4 << 20;

/// What to run.
#[derive(Debug, Clone)]
pub struct BaselineConfig {
    pub fanout: usize,
    /// Measured time, after `warmup`.
    pub duration: Duration,
    pub warmup: Duration,
    pub profile: SrtpProfile,
    pub forwarder_cpu: Option<usize>,
    pub generator_cpu: Option<usize>,
}

/// What was measured (over the measured time only).
#[derive(Debug, Clone, Serialize)]
pub struct BaselineReport {
    pub fanout: usize,
    pub profile: String,
    pub seconds: f64,
    pub in_packets: u64,
    pub out_packets: u64,
    pub out_bytes: u64,
    /// CPU seconds the forwarder thread used.
    pub forwarder_cpu_seconds: f64,
    /// Share of one core the forwarder used (1.0 = saturated).
    pub forwarder_core_share: f64,
    /// Output packets per second, wall clock.
    pub out_pps: f64,
    /// Output packets per second of forwarder CPU: the baseline figure.
    pub out_pps_per_core: f64,
    /// Copies the generator received (all receivers).
    pub received: u64,
    /// Sampled copies that authenticated / that did not.
    pub verified: u64,
    pub verify_failed: u64,
    /// Datagrams the forwarder could not decrypt or send.
    pub forward_errors: u64,
}

impl BaselineReport {
    pub fn summary(&self) -> String {
        format!(
            "raw baseline, fan-out {} ({}): {:.0} packets/s out over {:.1} s, forwarder at {:.0}% of \
             its core => {:.0} packets/s per core; {} in, {} out, {} received, {} of {} sampled \
             copies authenticated, {} forward errors\n",
            self.fanout,
            self.profile,
            self.out_pps,
            self.seconds,
            self.forwarder_core_share * 100.0,
            self.out_pps_per_core,
            self.in_packets,
            self.out_packets,
            self.received,
            self.verified,
            self.verified + self.verify_failed,
            self.forward_errors,
        )
    }
}

#[derive(Default)]
struct Counters {
    in_packets: AtomicU64,
    out_packets: AtomicU64,
    out_bytes: AtomicU64,
    forward_errors: AtomicU64,
    /// Forwarder thread CPU time in ns, updated every batch.
    cpu_ns: AtomicU64,
    received: AtomicU64,
    verified: AtomicU64,
    verify_failed: AtomicU64,
}

struct Snapshot {
    at: Instant,
    in_packets: u64,
    out_packets: u64,
    out_bytes: u64,
    forward_errors: u64,
    cpu_ns: u64,
    received: u64,
    verified: u64,
    verify_failed: u64,
}

impl Counters {
    fn snapshot(&self) -> Snapshot {
        let o = Ordering::Relaxed;
        Snapshot {
            at: Instant::now(),
            in_packets: self.in_packets.load(o),
            out_packets: self.out_packets.load(o),
            out_bytes: self.out_bytes.load(o),
            forward_errors: self.forward_errors.load(o),
            cpu_ns: self.cpu_ns.load(o),
            received: self.received.load(o),
            verified: self.verified.load(o),
            verify_failed: self.verify_failed.load(o),
        }
    }
}

/// Runs the baseline and returns what it measured.
pub fn run(cfg: &BaselineConfig) -> io::Result<BaselineReport> {
    if cfg.fanout == 0 || cfg.fanout > 250 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fan-out {} is not 1..=250", cfg.fanout),
        ));
    }
    edge_node::transport::install_crypto_provider();
    let forwarder = bind()?;
    let input = bind()?;
    let receivers: Vec<UdpSocket> = (0..cfg.fanout).map(|_| bind()).collect::<io::Result<_>>()?;
    let dests: Vec<SocketAddr> = receivers
        .iter()
        .map(|s| s.local_addr())
        .collect::<io::Result<_>>()?;
    let forwarder_addr = forwarder.local_addr()?;
    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));

    let fwd = {
        let (counters, stop, profile, cpu) = (
            counters.clone(),
            stop.clone(),
            cfg.profile,
            cfg.forwarder_cpu,
        );
        std::thread::Builder::new()
            .name("baseline-forwarder".into())
            .spawn(move || {
                pin(cpu);
                forward_loop(&forwarder, &dests, profile, &counters, &stop)
            })?
    };
    let generator = {
        let (counters, stop, profile, cpu, fanout) = (
            counters.clone(),
            stop.clone(),
            cfg.profile,
            cfg.generator_cpu,
            cfg.fanout,
        );
        std::thread::Builder::new()
            .name("baseline-generator".into())
            .spawn(move || {
                pin(cpu);
                generate_loop(
                    &input,
                    forwarder_addr,
                    &receivers,
                    fanout,
                    profile,
                    &counters,
                    &stop,
                )
            })?
    };
    std::thread::sleep(cfg.warmup);
    let a = counters.snapshot();
    std::thread::sleep(cfg.duration);
    let b = counters.snapshot();
    stop.store(true, Ordering::Relaxed);
    let fwd_result = fwd.join().expect("forwarder thread");
    let gen_result = generator.join().expect("generator thread");
    fwd_result?;
    gen_result?;
    let seconds = b.at.duration_since(a.at).as_secs_f64();
    let cpu = (b.cpu_ns - a.cpu_ns) as f64 / 1e9;
    let out = b.out_packets - a.out_packets;
    Ok(BaselineReport {
        fanout: cfg.fanout,
        profile: format!("{:?}", cfg.profile),
        seconds,
        in_packets: b.in_packets - a.in_packets,
        out_packets: out,
        out_bytes: b.out_bytes - a.out_bytes,
        forwarder_cpu_seconds: cpu,
        forwarder_core_share: cpu / seconds,
        out_pps: out as f64 / seconds,
        out_pps_per_core: if cpu > 0.0 { out as f64 / cpu } else { 0.0 },
        received: b.received - a.received,
        verified: b.verified - a.verified,
        verify_failed: b.verify_failed - a.verify_failed,
        forward_errors: b.forward_errors - a.forward_errors,
    })
}

fn bind() -> io::Result<UdpSocket> {
    use edge_node::udp::batch::{set_dont_fragment, set_int_option};
    let s = UdpSocket::bind("127.0.0.1:0")?;
    s.set_nonblocking(true)?;
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // A refusal keeps the default.
        let _ = set_int_option(s.as_raw_fd(), libc::SOL_SOCKET, opt, SOCKET_BUFFER);
    }
    // Don't-fragment without path MTU discovery, as the edge's media socket sends: the kernel
    // then skips hashing an IP id per datagram, and the ceiling stays a fair one.
    let _ = set_dont_fragment(s.as_raw_fd());
    Ok(s)
}

/// Pins the calling thread to `cpu` (no-op for `None`; a refusal is reported, not fatal).
fn pin(cpu: Option<usize>) {
    let Some(cpu) = cpu else { return };
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET and sched_setaffinity(0 = this thread) only
    // read and write it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!(
                "loadtest baseline: pinning to cpu {cpu} failed: {}",
                io::Error::last_os_error()
            );
        }
    }
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Waits until `fd` is readable or `timeout` passes.
fn wait_readable(fd: RawFd, timeout: Duration) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd we own.
    unsafe { libc::poll(&mut p, 1, timeout.as_millis() as libc::c_int) };
}

fn forward_loop(
    socket: &UdpSocket,
    dests: &[SocketAddr],
    profile: SrtpProfile,
    counters: &Counters,
    stop: &AtomicBool,
) -> io::Result<()> {
    let fd = socket.as_raw_fd();
    let mut inbound = SrtpSession::new(&test_keys(profile, 0).0).map_err(io::Error::other)?;
    let mut outbound: Vec<SrtpSession> = (0..dests.len())
        .map(|i| SrtpSession::new(&test_keys(profile, 1 + i as u8).0))
        .collect::<Result<_, _>>()
        .map_err(io::Error::other)?;
    let mut batch = RecvBatch::new();
    let mut copies: Vec<(usize, bytes::Bytes)> = Vec::new();
    // The edge's buffers: decrypt where received, encrypt copies into an arena.
    let mut arena = bytes::BytesMut::with_capacity(64 * 1024);
    let o = Ordering::Relaxed;
    while !stop.load(o) {
        let n = match batch.recv(fd) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait_readable(fd, Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(e),
        };
        copies.clear();
        let mut errors = 0;
        for i in 0..n {
            let Some((_, data)) = batch.get_mut(i) else {
                errors += 1;
                continue;
            };
            // Decrypt once, encrypt once per receiver with its own context.
            let Ok(plain_len) = inbound.decrypt_rtp_in_place(data) else {
                errors += 1;
                continue;
            };
            let plain = &data[..plain_len];
            for (k, ctx) in outbound.iter_mut().enumerate() {
                match ctx.encrypt_rtp_into(plain, &mut arena) {
                    Ok(c) => copies.push((k, c)),
                    Err(_) => errors += 1,
                }
            }
        }
        let items: Vec<(SocketAddr, &[u8])> = copies
            .iter()
            .map(|(k, c)| (dests[*k], c.as_ref()))
            .collect();
        let mut sent = 0;
        while sent < items.len() {
            match send_batch(fd, &items[sent..]) {
                Ok(k) if k > 0 => sent += k,
                // Loopback send buffers full: drop the rest, as a forwarder would.
                Ok(_) | Err(_) => break,
            }
        }
        errors += items.len() - sent;
        counters.in_packets.fetch_add(n as u64, o);
        counters.out_packets.fetch_add(sent as u64, o);
        counters
            .out_bytes
            .fetch_add(items[..sent].iter().map(|(_, c)| c.len() as u64).sum(), o);
        counters.forward_errors.fetch_add(errors as u64, o);
        counters.cpu_ns.store(thread_cpu_ns(), o);
    }
    Ok(())
}

/// The input mix: 2 s of the load tester's top camera layer and audio, as plain payloads with
/// their RTP fields. Replayed in a loop with running sequence numbers.
fn input_mix() -> Vec<(bool, bool, Vec<u8>)> {
    let t0 = Instant::now();
    let mut audio = AudioSource::new(0, t0);
    let mut video = VideoSource::new(0, VideoProfile::camera(3), t0);
    let mut out = Vec::new();
    let mut now = t0;
    let end = t0 + Duration::from_secs(2);
    while now < end {
        while audio.next_due() <= now {
            out.push((true, false, audio.poll(now).payload));
        }
        while video.next_due() <= now {
            for p in video.poll(now).into_iter().filter(|p| p.layer == 2) {
                out.push((false, p.marker, p.payload));
            }
        }
        now += Duration::from_millis(1);
    }
    out
}

fn generate_loop(
    input: &UdpSocket,
    forwarder: SocketAddr,
    receivers: &[UdpSocket],
    fanout: usize,
    profile: SrtpProfile,
    counters: &Counters,
    stop: &AtomicBool,
) -> io::Result<()> {
    let mut encrypt = SrtpSession::new(&test_keys(profile, 0).1).map_err(io::Error::other)?;
    let mut verify: Vec<SrtpSession> = (0..fanout)
        .map(|i| SrtpSession::new(&test_keys(profile, 1 + i as u8).1))
        .collect::<Result<_, _>>()
        .map_err(io::Error::other)?;
    let mix = input_mix();
    let (audio_ssrc, video_ssrc) = (0x0a0a_0a0a_u32, 0x0b0b_0b0b_u32);
    let (mut audio_seq, mut video_seq) = (0u16, 0u16);
    let (mut audio_ts, mut video_ts) = (0u32, 0u32);
    let mut next = 0usize;
    let mut plain = Vec::with_capacity(1500);
    let mut sent_in = 0u64;
    let mut received = 0u64;
    let mut batch = RecvBatch::new();
    let mut last_progress = Instant::now();
    let o = Ordering::Relaxed;
    let mut encrypted: Vec<bytes::Bytes> = Vec::with_capacity(32);
    while !stop.load(o) {
        // Keep IN_FLIGHT input packets ahead of what the forwarder has read (copies lost on
        // the way back do not throttle the input); after 5 ms without progress send anyway so
        // the loop cannot stall.
        let in_flight = sent_in.saturating_sub(counters.in_packets.load(o));
        let stalled = last_progress.elapsed() > Duration::from_millis(5);
        if in_flight < IN_FLIGHT || stalled {
            encrypted.clear();
            for _ in 0..32 {
                let (is_audio, marker, payload) = &mix[next % mix.len()];
                next += 1;
                let (pt, seq, ts, ssrc) = if *is_audio {
                    audio_seq = audio_seq.wrapping_add(1);
                    audio_ts = audio_ts.wrapping_add(960);
                    (111, audio_seq, audio_ts, audio_ssrc)
                } else {
                    video_seq = video_seq.wrapping_add(1);
                    if *marker {
                        video_ts = video_ts.wrapping_add(3000);
                    }
                    (96, video_seq, video_ts, video_ssrc)
                };
                write_rtp(
                    &mut plain,
                    RtpHeader {
                        pt,
                        marker: *marker,
                        seq,
                        timestamp: ts,
                        ssrc,
                    },
                    OutExt::default(),
                    payload,
                );
                encrypted.push(encrypt.encrypt_rtp(&plain).map_err(io::Error::other)?);
            }
            let items: Vec<(SocketAddr, &[u8])> =
                encrypted.iter().map(|p| (forwarder, p.as_ref())).collect();
            let k = send_batch(input.as_raw_fd(), &items).unwrap_or(0);
            sent_in += k as u64;
            if stalled {
                last_progress = Instant::now();
            }
        }
        let mut got_any = false;
        for (r, socket) in receivers.iter().enumerate() {
            while let Ok(n) = batch.recv(socket.as_raw_fd()) {
                if n == 0 {
                    break;
                }
                got_any = true;
                for i in 0..n {
                    received += 1;
                    if received.is_multiple_of(VERIFY_EVERY) {
                        let ok = batch
                            .get(i)
                            .is_some_and(|(_, d)| verify[r].decrypt_rtp(d).is_ok());
                        let c = if ok {
                            &counters.verified
                        } else {
                            &counters.verify_failed
                        };
                        c.fetch_add(1, o);
                    }
                }
            }
        }
        if got_any {
            last_progress = Instant::now();
            counters.received.store(received, o);
        } else if in_flight >= IN_FLIGHT {
            wait_readable(receivers[0].as_raw_fd(), Duration::from_millis(1));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_authentic_copies_to_every_receiver() {
        let r = run(&BaselineConfig {
            fanout: 4,
            duration: Duration::from_millis(500),
            warmup: Duration::from_millis(200),
            profile: SrtpProfile::AeadAes128Gcm,
            forwarder_cpu: None,
            generator_cpu: None,
        })
        .expect("baseline runs");
        assert!(r.in_packets > 0, "{r:?}");
        assert!(r.out_packets >= r.in_packets * 4 * 9 / 10, "{r:?}");
        assert!(r.received > 0 && r.verified > 0, "{r:?}");
        assert_eq!(r.verify_failed, 0, "{r:?}");
        assert!(
            r.forwarder_cpu_seconds > 0.0 && r.out_pps_per_core > 0.0,
            "{r:?}"
        );
    }

    #[test]
    fn refuses_a_fanout_out_of_range() {
        let cfg = |fanout| BaselineConfig {
            fanout,
            duration: Duration::ZERO,
            warmup: Duration::ZERO,
            profile: SrtpProfile::AeadAes128Gcm,
            forwarder_cpu: None,
            generator_cpu: None,
        };
        assert!(run(&cfg(0)).is_err());
        assert!(run(&cfg(251)).is_err());
    }
}
