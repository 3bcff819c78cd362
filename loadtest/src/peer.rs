//! One simulated peer connection: its UDP socket, ICE (controlling), DTLS client, SRTP and RTCP.
//!
//! The protocol pieces are the edge's own ([`edge_node::transport`]): Binding requests from
//! [`ice::binding_request`], the DTLS client [`dtls::connect`] over channels, [`SrtpSession`]
//! and the panic-free RTCP parser. This module is the thin async shell around them:
//!
//! - one socket per peer connection, like a browser's 5-tuple, on the loopback or given address;
//! - a receive task per peer (not per packet): woken once per burst, it reads every queued
//!   datagram with one `recvmmsg` (the edge's [`RecvBatch`], one per runtime thread, so a
//!   thousand peers do not hold a thousand 64 KiB buffers), classifies each (RFC 7983), feeds
//!   DTLS, decrypts SRTP/SRTCP, runs the [`Receiver`] (subscriber) or handles NACK/PLI/FIR
//!   (publisher), and sends the RTCP that results once per burst;
//! - a tick task per peer: TWCC feedback, receiver reports, ICE consent (a Binding request every
//!   [`CONSENT_INTERVAL`], as browsers do, RFC 7675) and flushing measurements.
//!
//! State shared by these tasks and the participant's media task sits behind one short
//! `std::sync::Mutex` per peer, never held across an `.await`.

use crate::media::{read_rtp, unix_micros};
use crate::recv::Receiver;
use crate::sdp::RemoteDescription;
use crate::stats::{Pending, Shared};
use bytes::Bytes;
use edge_node::transport::demux::{classify, PacketClass};
use edge_node::transport::dtls::{self, DtlsCertificate, DtlsSession, Fingerprint};
use edge_node::transport::ice;
use edge_node::transport::srtp::SrtpSession;
use edge_node::udp::batch::RecvBatch;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

/// Browsers send a consent check every 5 s or so (RFC 7675 §5.1 says 4-6 s, randomized).
const CONSENT_INTERVAL: Duration = Duration::from_secs(5);
/// ICE: retransmit the Binding request this often until answered.
const ICE_RETRY: Duration = Duration::from_millis(100);
/// Packets a publisher keeps for answering NACKs: 1 s of the top layer and some.
const HISTORY: usize = 1024;

thread_local! {
    /// Receive buffers of this runtime thread, shared by its peers: each use is synchronous
    /// (no `.await` while borrowed).
    static RECV_BATCH: RefCell<RecvBatch> = RefCell::new(RecvBatch::new());
}

/// What handling a burst of datagrams leaves to send: plain RTCP (to encrypt) and SRTP
/// packets to retransmit (already encrypted).
#[derive(Default)]
struct Outgoing {
    rtcp: Vec<Vec<u8>>,
    resend: Vec<Bytes>,
}

/// Why a peer connection did not come up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    #[error("binding a UDP socket on {0} failed: {1}")]
    Bind(IpAddr, std::io::Error),
    #[error("ICE: no Binding response from {0} within {1:?}")]
    IceTimeout(SocketAddr, Duration),
    #[error("DTLS with {0}: {1}")]
    Dtls(SocketAddr, #[source] dtls::DtlsError),
    #[error("bad remote fingerprint: {0}")]
    Fingerprint(#[source] dtls::DtlsError),
    #[error("SRTP setup failed: {0}")]
    Srtp(String),
}

/// What a publisher needs to answer the edge's RTCP.
#[derive(Debug, Default)]
pub struct SenderState {
    /// SSRCs we send, in layer order (audio has its own entry with layer 255).
    pub ssrcs: Vec<(u32, u8)>,
    history: VecDeque<(u32, u16, Bytes)>,
    /// Layers for which a keyframe was asked (PLI/FIR), drained by the media task.
    pub keyframe_requests: Vec<u8>,
    /// Answer NACKs with retransmissions (off when a run measures unrepaired loss).
    pub retransmit: bool,
}

#[derive(Default)]
struct State {
    srtp: Option<SrtpSession>,
    dtls_in: Option<mpsc::Sender<Vec<u8>>>,
    receiver: Option<Receiver>,
    sender: Option<SenderState>,
    twcc_id: Option<u8>,
    pending: Pending,
}

/// One peer connection.
pub struct Peer {
    socket: Arc<UdpSocket>,
    remote: Mutex<Option<SocketAddr>>,
    state: Mutex<State>,
    ice_ok: Notify,
    ice_done: AtomicBool,
    /// Our ICE password, when the server is a full ICE agent whose checks we answer
    /// ([`crate::ice_responder`]); `None` toward the ICE-lite edge.
    answer_checks_with: Mutex<Option<String>>,
    /// We are the controlling agent (we offered, or the server is ICE-lite): we nominate and
    /// send consent checks. The controlled side waits for the server's nomination instead.
    controlling: AtomicBool,
    /// We answered at least one of the server's checks (full-ICE servers only).
    answered_check: AtomicBool,
    closed: AtomicBool,
    /// Milliseconds since `epoch` of the last authenticated datagram from the edge.
    last_rx_ms: AtomicU64,
    epoch: Instant,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    dtls: tokio::sync::Mutex<Option<DtlsSession>>,
    collector: Shared,
    /// ICE credentials for consent checks: (username, remote password).
    ice_creds: Mutex<Option<(String, String)>>,
}

/// Durations of the connection phases.
#[derive(Debug, Clone, Copy)]
pub struct ConnectTimes {
    pub ice: Duration,
    pub dtls: Duration,
}

impl Peer {
    /// Binds a socket on `ip` (port chosen by the OS) and starts the receive and tick tasks.
    /// `receiver`: this peer receives media (subscriber); otherwise it sends (publisher).
    pub async fn bind(
        ip: IpAddr,
        receiver: Option<Receiver>,
        collector: Shared,
    ) -> Result<Arc<Peer>, PeerError> {
        let socket = UdpSocket::bind(SocketAddr::new(ip, 0))
            .await
            .map_err(|e| PeerError::Bind(ip, e))?;
        let is_sender = receiver.is_none();
        let peer = Arc::new(Peer {
            socket: Arc::new(socket),
            remote: Mutex::new(None),
            state: Mutex::new(State {
                receiver,
                sender: is_sender.then(|| SenderState {
                    retransmit: true,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ice_ok: Notify::new(),
            ice_done: AtomicBool::new(false),
            answer_checks_with: Mutex::new(None),
            controlling: AtomicBool::new(true),
            answered_check: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            last_rx_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            tasks: Mutex::new(Vec::new()),
            dtls: tokio::sync::Mutex::new(None),
            collector,
            ice_creds: Mutex::new(None),
        });
        let rx = tokio::spawn(Self::receive_loop(peer.clone()));
        let tick = tokio::spawn(Self::tick_loop(peer.clone()));
        peer.tasks.lock().expect("tasks lock").extend([rx, tick]);
        Ok(peer)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.socket
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Toward a full ICE agent (Janus): answer its connectivity checks with our password
    /// `local_pwd`, and take the `controlling` role or, when not, wait for its nomination in
    /// [`connect`](Self::connect) instead of nominating. Call before `connect`.
    pub fn answer_checks(&self, local_pwd: &str, controlling: bool) {
        *self.answer_checks_with.lock().expect("peer lock") = Some(local_pwd.to_owned());
        self.controlling.store(controlling, Ordering::Release);
    }

    /// The header-extension id of transport-wide sequence numbers in the negotiated SDP.
    pub fn set_twcc_id(&self, id: Option<u8>) {
        self.state.lock().expect("peer lock").twcc_id = id;
    }

    /// Whether a publisher answers the edge's NACKs (default yes).
    pub fn set_retransmit(&self, on: bool) {
        if let Some(s) = self.state.lock().expect("peer lock").sender.as_mut() {
            s.retransmit = on;
        }
    }

    pub fn set_sender_ssrcs(&self, ssrcs: Vec<(u32, u8)>) {
        if let Some(s) = self.state.lock().expect("peer lock").sender.as_mut() {
            s.ssrcs = ssrcs;
        }
    }

    /// Since when nothing authenticated came from the edge (since connect when nothing ever).
    pub fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_rx_ms.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }

    pub fn first_media(&self) -> Option<Instant> {
        self.state
            .lock()
            .expect("peer lock")
            .receiver
            .as_ref()
            .and_then(|r| r.first_media)
    }

    /// ICE (controlling: we nominate at once, as the edge is ICE-lite; controlled, see
    /// [`answer_checks`](Self::answer_checks): we wait for the server's nomination) and then the
    /// DTLS client handshake; SRTP is ready when this returns.
    pub async fn connect(
        self: &Arc<Self>,
        remote: SocketAddr,
        desc: &RemoteDescription,
        local_ufrag: &str,
        cert: &DtlsCertificate,
        timeout: Duration,
    ) -> Result<ConnectTimes, PeerError> {
        let (remote_ufrag, remote_pwd) = (&desc.ufrag, &desc.pwd);
        let fp = Fingerprint::parse_sha256(&desc.fingerprint).map_err(PeerError::Fingerprint)?;
        *self.remote.lock().expect("peer lock") = Some(remote);
        let username = format!("{remote_ufrag}:{local_ufrag}");
        *self.ice_creds.lock().expect("peer lock") =
            Some((username.clone(), remote_pwd.to_owned()));

        // ICE: RFC 8445 §7.2.5.3 — the check is done when a success response arrives.
        let started = Instant::now();
        let deadline = started + timeout;
        let controlling = self.controlling.load(Ordering::Acquire);
        loop {
            if controlling {
                let req = ice::binding_request(&username, remote_pwd, true);
                let _ = self.socket.send_to(&req, remote).await;
            }
            let wait = tokio::time::sleep(ICE_RETRY);
            tokio::select! {
                _ = self.ice_ok.notified() => break,
                _ = wait => {}
            }
            if self.ice_done.load(Ordering::Acquire) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(PeerError::IceTimeout(remote, timeout));
            }
        }
        // A full-ICE server (Janus) that we nominate starts DTLS only once its own check of
        // the pair succeeded: wait until we have answered one, or our ClientHello is dropped
        // and the handshake waits a whole DTLS retransmission (1 s).
        let full_ice = self.answer_checks_with.lock().expect("peer lock").is_some();
        if controlling && full_ice {
            while !self.answered_check.load(Ordering::Acquire) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ice_time = started.elapsed();

        // DTLS: the client (`a=setup:active`) side, fed through channels by the receive task.
        let dtls_started = Instant::now();
        let (in_tx, in_rx) = mpsc::channel(64);
        let (out_tx, mut out_rx) = mpsc::channel::<(SocketAddr, Vec<u8>)>(64);
        self.state.lock().expect("peer lock").dtls_in = Some(in_tx);
        let socket = self.socket.clone();
        let writer = tokio::spawn(async move {
            while let Some((to, data)) = out_rx.recv().await {
                let _ = socket.send_to(&data, to).await;
            }
        });
        self.tasks.lock().expect("tasks lock").push(writer);
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        let (keys, session) = dtls::connect(cert, remote, &fp, in_rx, out_tx, left)
            .await
            .map_err(|e| PeerError::Dtls(remote, e))?;
        let srtp = SrtpSession::new(&keys).map_err(|e| PeerError::Srtp(e.to_string()))?;
        self.state.lock().expect("peer lock").srtp = Some(srtp);
        *self.dtls.lock().await = Some(session);
        Ok(ConnectTimes {
            ice: ice_time,
            dtls: dtls_started.elapsed(),
        })
    }

    /// Encrypts and sends one RTP packet; keeps it for NACKs. Returns the bytes sent (0 when
    /// not connected or the send failed).
    pub async fn send_rtp(&self, plain: &[u8], ssrc: u32, seq: u16) -> usize {
        let Some(remote) = *self.remote.lock().expect("peer lock") else {
            return 0;
        };
        let protected = {
            let mut st = self.state.lock().expect("peer lock");
            let Some(srtp) = st.srtp.as_mut() else {
                return 0;
            };
            let Ok(p) = srtp.encrypt_rtp(plain) else {
                st.pending.counters.srtp_errors += 1;
                return 0;
            };
            // Bytes: the history keeps a reference to the same buffer, no copy.
            st.pending.counters.tx_packets += 1;
            st.pending.counters.tx_bytes += p.len() as u64;
            if let Some(s) = st.sender.as_mut() {
                if s.history.len() >= HISTORY {
                    s.history.pop_front();
                }
                s.history.push_back((ssrc, seq, p.clone()));
            }
            p
        };
        self.socket
            .send_to(&protected, remote)
            .await
            .unwrap_or_default()
    }

    /// Layers the edge asked keyframes for since the last call.
    pub fn take_keyframe_requests(&self) -> Vec<u8> {
        let mut st = self.state.lock().expect("peer lock");
        st.sender
            .as_mut()
            .map(|s| std::mem::take(&mut s.keyframe_requests))
            .unwrap_or_default()
    }

    /// Stops the tasks and sends DTLS close_notify. Idempotent.
    pub async fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(d) = self.dtls.lock().await.take() {
            let _ = tokio::time::timeout(Duration::from_millis(200), d.close()).await;
        }
        self.flush();
        for t in self.tasks.lock().expect("tasks lock").drain(..) {
            t.abort();
        }
    }

    fn flush(&self) {
        let mut st = self.state.lock().expect("peer lock");
        let st = &mut *st;
        if let Some(r) = st.receiver.as_mut() {
            if !r.pending.is_empty() {
                self.collector
                    .lock()
                    .expect("collector lock")
                    .flush(&mut r.pending);
            }
        }
        if !st.pending.is_empty() || st.pending.counters.nack_received > 0 {
            self.collector
                .lock()
                .expect("collector lock")
                .flush(&mut st.pending);
        }
    }

    async fn send_rtcp(&self, plain: Vec<Vec<u8>>) {
        if plain.is_empty() {
            return;
        }
        let Some(remote) = *self.remote.lock().expect("peer lock") else {
            return;
        };
        let protected: Vec<Vec<u8>> = {
            let mut st = self.state.lock().expect("peer lock");
            let Some(srtp) = st.srtp.as_mut() else {
                return;
            };
            plain
                .iter()
                .filter_map(|p| srtp.encrypt_rtcp(p).ok().map(|b| b.to_vec()))
                .collect()
        };
        for p in protected {
            let _ = self.socket.send_to(&p, remote).await;
        }
    }

    async fn tick_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(crate::recv::TWCC_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_consent = Instant::now() + CONSENT_INTERVAL;
        loop {
            tick.tick().await;
            let now = Instant::now();
            let rtcp = {
                let mut st = self.state.lock().expect("peer lock");
                let connected = st.srtp.is_some();
                match st.receiver.as_mut() {
                    Some(r) if connected => r.poll_rtcp(now),
                    _ => Vec::new(),
                }
            };
            self.send_rtcp(rtcp).await;
            self.flush();
            if now >= next_consent
                && self.ice_done.load(Ordering::Acquire)
                && self.controlling.load(Ordering::Acquire)
            {
                next_consent = now + CONSENT_INTERVAL;
                let creds = self.ice_creds.lock().expect("peer lock").clone();
                let remote = *self.remote.lock().expect("peer lock");
                if let (Some((user, pwd)), Some(remote)) = (creds, remote) {
                    let _ = self
                        .socket
                        .send_to(&ice::binding_request(&user, &pwd, true), remote)
                        .await;
                }
            }
        }
    }

    async fn receive_loop(self: Arc<Self>) {
        let fd = self.socket.as_raw_fd();
        let mut out = Outgoing::default();
        loop {
            if self.socket.readable().await.is_err() {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            // One wakeup per burst: read every queued datagram, a batch per syscall, until the
            // socket is empty (`try_io` clears readiness on WouldBlock).
            let read = self.socket.try_io(Interest::READABLE, || {
                RECV_BATCH.with(|batch| {
                    let mut batch = batch.borrow_mut();
                    let n = batch.recv(fd)?;
                    let (now, now_us) = (Instant::now(), unix_micros());
                    for i in 0..n {
                        if let Some((from, data)) = batch.get(i) {
                            self.handle_datagram(data, from, now, now_us, &mut out);
                        }
                    }
                    Ok(n)
                })
            });
            match read {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // ICMP port unreachable surfaces as an error on Linux: keep reading.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
            if !out.rtcp.is_empty() {
                self.send_rtcp(std::mem::take(&mut out.rtcp)).await;
            }
            if !out.resend.is_empty() {
                let remote = *self.remote.lock().expect("peer lock");
                if let Some(remote) = remote {
                    for p in out.resend.drain(..) {
                        let _ = self.socket.send_to(&p, remote).await;
                    }
                }
                out.resend.clear();
            }
        }
    }

    /// Answers a full ICE server's connectivity check (a rare packet: a non-blocking send is
    /// enough, the server retries a check it gets no answer to).
    fn answer_check(&self, data: &[u8], from: SocketAddr) {
        let pwd = self.answer_checks_with.lock().expect("peer lock").clone();
        let Some(answer) = pwd.and_then(|p| crate::ice_responder::answer_check(data, from, &p))
        else {
            return;
        };
        let _ = self.socket.try_send_to(&answer.reply, from);
        self.answered_check.store(true, Ordering::Release);
        self.mark_alive();
        // The controlled side is connected once the server nominated a pair.
        if answer.nominated
            && !self.controlling.load(Ordering::Acquire)
            && !self.ice_done.swap(true, Ordering::AcqRel)
        {
            self.ice_ok.notify_waiters();
        }
    }

    fn handle_datagram(
        &self,
        data: &[u8],
        from: SocketAddr,
        now: Instant,
        now_us: u64,
        out: &mut Outgoing,
    ) {
        match classify(data) {
            PacketClass::Stun => {
                // A full ICE server checks us too (Binding request, 0x0001).
                if data.len() >= 2 && data[0] == 0x00 && data[1] == 0x01 {
                    self.answer_check(data, from);
                }
                // A Binding success response (0x0101) is all we wait for.
                if data.len() >= 2 && data[0] == 0x01 && data[1] == 0x01 {
                    self.mark_alive();
                    if !self.ice_done.swap(true, Ordering::AcqRel) {
                        self.ice_ok.notify_waiters();
                    }
                }
            }
            PacketClass::Dtls => {
                let tx = self.state.lock().expect("peer lock").dtls_in.clone();
                if let Some(tx) = tx {
                    let _ = tx.try_send(data.to_vec());
                }
            }
            PacketClass::Rtp => self.handle_rtp(data, now, now_us, out),
            PacketClass::Rtcp => self.handle_rtcp(data, out),
            PacketClass::Unknown => {}
        }
    }

    fn mark_alive(&self) {
        self.last_rx_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn handle_rtp(&self, data: &[u8], now: Instant, now_us: u64, out: &mut Outgoing) {
        {
            let mut st = self.state.lock().expect("peer lock");
            let st = &mut *st;
            let Some(srtp) = st.srtp.as_mut() else { return };
            let plain = match srtp.decrypt_rtp(data) {
                Ok(p) => p,
                Err(_) => {
                    st.pending.counters.srtp_errors += 1;
                    return;
                }
            };
            let Some(r) = st.receiver.as_mut() else {
                return;
            };
            let Some(pkt) = read_rtp(&plain, st.twcc_id) else {
                return;
            };
            r.handle_rtp(pkt, now, now_us);
            out.rtcp.extend(r.poll_rtcp(now));
        }
        self.mark_alive();
    }

    fn handle_rtcp(&self, data: &[u8], out: &mut Outgoing) {
        use rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
        use rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
        use rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc;
        use rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
        let resend = &mut out.resend;
        let resent_before = resend.len();
        {
            let mut st = self.state.lock().expect("peer lock");
            let st = &mut *st;
            let Some(srtp) = st.srtp.as_mut() else { return };
            let Ok(plain) = srtp.decrypt_rtcp(data) else {
                st.pending.counters.srtp_errors += 1;
                return;
            };
            let Ok(packets) = edge_node::transport::parse::parse_rtcp(&plain) else {
                return;
            };
            let Some(sender) = st.sender.as_mut() else {
                self.mark_alive();
                return;
            };
            let c = &mut st.pending.counters;
            for p in &packets {
                let any = p.as_any();
                if let Some(n) = any.downcast_ref::<TransportLayerNack>() {
                    c.nack_received += 1;
                    if !sender.retransmit {
                        continue;
                    }
                    for pair in &n.nacks {
                        for seq in pair.packet_list() {
                            if let Some((_, _, bytes)) = sender
                                .history
                                .iter()
                                .rev()
                                .find(|(s, q, _)| *s == n.media_ssrc && *q == seq)
                            {
                                resend.push(bytes.clone());
                            }
                        }
                    }
                } else if let Some(pli) = any.downcast_ref::<PictureLossIndication>() {
                    c.pli_received += 1;
                    if let Some(&(_, layer)) =
                        sender.ssrcs.iter().find(|(s, _)| *s == pli.media_ssrc)
                    {
                        sender.keyframe_requests.push(layer);
                    }
                } else if let Some(fir) = any.downcast_ref::<FullIntraRequest>() {
                    c.pli_received += 1;
                    for e in &fir.fir {
                        if let Some(&(_, layer)) = sender.ssrcs.iter().find(|(s, _)| *s == e.ssrc) {
                            sender.keyframe_requests.push(layer);
                        }
                    }
                } else if any.downcast_ref::<TransportLayerCc>().is_some() {
                    c.twcc_received += 1;
                }
            }
            c.retransmitted += (resend.len() - resent_before) as u64;
        }
        self.mark_alive();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        for t in self
            .tasks
            .get_mut()
            .map(|t| t.drain(..))
            .into_iter()
            .flatten()
        {
            t.abort();
        }
    }
}
