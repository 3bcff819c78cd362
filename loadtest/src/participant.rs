//! One simulated participant from join to leave: signaling, its peer connections and its
//! media. Participants are tokio tasks (many per thread), never threads of their own.
//!
//! WebSocket mode follows docs/protocol.md: `room:join`, then `produce` for the publisher PC
//! (we offer, the edge answers) and, with `autoSubscribe`, the edge's `sdp:offer`s for the
//! subscriber PC, answered with `sdp:answer` at each renegotiation; `consumer:layers` sets the
//! wanted simulcast layer. WHIP mode publishes with `POST /whip/{room}` and receives with
//! `POST /whep/{room}` (the room's latest publisher).
//!
//! Failures end the participant and are recorded with the reason; a stop signal ends it
//! cleanly (`room:leave`, DTLS close_notify).

use crate::janus::JanusClient;
use crate::media::{write_rtp, AudioSource, OutExt, RtpHeader, VideoProfile, VideoSource};
use crate::peer::{ConnectTimes, Peer, PeerError};
use crate::recv::Receiver;
use crate::roster::RosterView;
use crate::scenario::{Mode, Publish};
use crate::sdp::{self, LocalTransport, PublishShape, RemoteDescription, PT_OPUS, PT_VP8, RIDS};
use crate::signaling::{self, ServerKind, SignalingError, Target, TokenSource, WsClient};
use crate::stats::{JoinTimes, Shared};
use edge_node::transport::dtls::DtlsCertificate;
use edge_node::transport::ice::IceCredentials;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// ICE + DTLS must finish within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A sender that falls this far behind its schedule skips ahead instead of bursting.
const MAX_CATCH_UP: Duration = Duration::from_millis(500);

/// What all participants of a run share.
pub struct Context {
    pub target: Target,
    pub tokens: TokenSource,
    pub cert: DtlsCertificate,
    pub collector: Shared,
    /// Drives the periodic work of every peer connection of the run (no timer per peer).
    pub ticker: Arc<crate::peer::Ticker>,
    /// The shared loopback socket for peers toward a loopback edge (see `peer`), if bound.
    pub hub: Option<Arc<crate::peer::Hub>>,
    /// Where publishers pace their media (see [`Pacer`]).
    pub pacer: Pacer,
    /// Send media here instead of the edge's candidate (a delay relay in the path).
    pub media_via: Option<SocketAddr>,
    /// Local address to bind peer sockets on.
    pub local_ip: IpAddr,
    pub room: String,
    /// Identities are `<prefix>-<group>-<index>`: processes sharing a room use different ones.
    pub identity_prefix: String,
    /// The Janus room id `room` maps to (when the target is Janus; the runner made sure the
    /// room exists).
    pub janus_room: u64,
    pub mode: Mode,
    pub nack: bool,
    pub stop: watch::Receiver<bool>,
}

/// A thread of its own on which every publisher of the run paces and sends its media.
///
/// Why: a browser's encoder and pacer do not wait for other people's handshakes, but on the
/// tool's few runtime threads a step of a capacity search puts hundreds of ICE and DTLS
/// handshakes (each a few polls of public-key work) in the run queue ahead of a publisher's
/// timer, and its frames then left tens of milliseconds late: the load's shape changed in the
/// very seconds being measured. Here the publishers' timers only wait for each other.
/// Dropping it stops the thread.
pub struct Pacer {
    pub handle: tokio::runtime::Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Pacer {
    pub fn start() -> std::io::Result<Pacer> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("pacer".into())
            .spawn(move || {
                let _ = rt.block_on(stopped);
            })?;
        Ok(Pacer {
            handle,
            _stop: stop,
        })
    }
}

impl std::fmt::Debug for Pacer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pacer").finish_non_exhaustive()
    }
}

/// One participant's part in the scenario.
#[derive(Debug, Clone)]
pub struct Spec {
    pub index: u32,
    pub group: String,
    pub publish: Publish,
    pub subscribe: bool,
    pub max_layer: Option<u8>,
    /// A new max layer for every video track received, each time one is sent (a viewer's tile
    /// resized mid-run: the edge's layer demand upstream follows). WebSocket mode only.
    pub max_layer_changes: Option<watch::Receiver<u8>>,
}

/// Why a participant ended early.
#[derive(Debug, thiserror::Error)]
pub enum ParticipantError {
    #[error(transparent)]
    Signaling(#[from] SignalingError),
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error("bad SDP from the server: {0}")]
    Sdp(#[from] sdp::SdpReadError),
    #[error("{0}")]
    Server(String),
}

impl ParticipantError {
    pub fn is_fatal(&self) -> bool {
        matches!(self, ParticipantError::Signaling(e) if e.is_fatal())
    }
}

/// The next max layer sent on `changes`; pending forever without a sender (or once it is gone).
async fn next_max_layer(changes: &mut Option<watch::Receiver<u8>>) -> Option<u8> {
    let Some(rx) = changes else {
        return std::future::pending().await;
    };
    if rx.changed().await.is_err() {
        *changes = None;
        return None;
    }
    Some(*rx.borrow_and_update())
}

fn local_transport(peer: &Peer, ice: &IceCredentials, cert: &DtlsCertificate) -> LocalTransport {
    LocalTransport {
        ufrag: ice.ufrag.clone(),
        pwd: ice.pwd.clone(),
        fingerprint: cert.fingerprint_sha256(),
        candidate: peer.local_addr(),
    }
}

/// Runs a participant until `ctx.stop` or a failure. Records join times, connected state and
/// failures in the collector.
pub async fn run(ctx: Arc<Context>, spec: Spec) -> Result<(), ParticipantError> {
    let identity = format!("{}-{}-{}", ctx.identity_prefix, spec.group, spec.index);
    let role = if spec.publish == Publish::None {
        "attendee"
    } else {
        "presenter"
    };
    let token = match ctx.target.kind {
        ServerKind::Kcs => {
            ctx.tokens
                .token(&ctx.target, &ctx.room, &identity, role)
                .await?
        }
        ServerKind::Janus => String::new(),
    };
    let mut life = Life {
        ctx: ctx.clone(),
        spec: spec.clone(),
        t0: Instant::now(),
        times: JoinTimes::default(),
        peers: Vec::new(),
        counted_connected: false,
        media: None,
        pending_times: None,
        roster: None,
    };
    let result = match (ctx.target.kind, ctx.mode) {
        (ServerKind::Janus, _) => life.run_janus(&identity).await,
        (ServerKind::Kcs, Mode::Ws) => life.run_ws(&identity, &token).await,
        (ServerKind::Kcs, Mode::Whip) => life.run_whip(&token).await,
    };
    life.finish().await;
    result
}

struct Life {
    ctx: Arc<Context>,
    spec: Spec,
    t0: Instant,
    times: JoinTimes,
    peers: Vec<Arc<Peer>>,
    counted_connected: bool,
    media: Option<tokio::task::JoinHandle<()>>,
    /// Phase times of a subscriber PC connecting in the background.
    pending_times: Option<Arc<std::sync::Mutex<Option<ConnectTimes>>>>,
    /// The session's view of the room (WS mode, once joined).
    roster: Option<RosterView>,
}

fn ms(d: Duration) -> Option<f64> {
    Some(d.as_secs_f64() * 1000.0)
}

impl Life {
    fn take_pending_times(&mut self) {
        let Some(slot) = &self.pending_times else {
            return;
        };
        let Some(t) = *slot.lock().expect("slot") else {
            return;
        };
        if self.times.ice_ms.is_none() {
            self.times.ice_ms = ms(t.ice);
            self.times.dtls_ms = ms(t.dtls);
        }
        self.pending_times = None;
    }

    /// The shared socket, when this participant's peers may use it: toward the edge with no
    /// relay in the path (Janus, a full ICE agent in its own namespace, gets a socket per peer).
    fn hub(&self) -> Option<&crate::peer::Hub> {
        let direct = self.ctx.media_via.is_none()
            && self.ctx.target.kind == crate::signaling::ServerKind::Kcs;
        self.ctx.hub.as_deref().filter(|_| direct)
    }

    fn remote_addr(&self, remote: &RemoteDescription) -> SocketAddr {
        self.ctx
            .media_via
            .unwrap_or_else(|| remote.pick_candidate(Some(self.ctx.target.addr.ip())))
    }

    async fn connect_peer(
        &mut self,
        peer: &Arc<Peer>,
        ice: &IceCredentials,
        remote: &RemoteDescription,
    ) -> Result<(), ParticipantError> {
        let addr = self.remote_addr(remote);
        let t = peer
            .connect(addr, remote, &ice.ufrag, &self.ctx.cert, CONNECT_TIMEOUT)
            .await?;
        // The first PC's phases are the participant's join phases.
        if self.times.ice_ms.is_none() {
            self.times.ice_ms = ms(t.ice);
            self.times.dtls_ms = ms(t.dtls);
        }
        peer.set_twcc_id(remote.ext_ids().twcc);
        Ok(())
    }

    async fn publish_peer(
        &mut self,
    ) -> Result<(Arc<Peer>, IceCredentials, String, Vec<String>), ParticipantError> {
        let peer = Peer::bind(
            self.ctx.local_ip,
            None,
            self.ctx.collector.clone(),
            &self.ctx.ticker,
            self.hub(),
        )
        .await?;
        peer.set_retransmit(self.ctx.nack);
        self.peers.push(peer.clone());
        let ice = IceCredentials::random();
        let local = local_transport(&peer, &ice, &self.ctx.cert);
        let (offer, mids) = sdp::publish_offer(
            &local,
            PublishShape {
                audio: self.spec.publish.audio(),
                video_layers: self.spec.publish.video_layers(),
            },
        );
        Ok((peer, ice, offer, mids))
    }

    fn mark_connected(&mut self) {
        if !self.counted_connected {
            self.counted_connected = true;
            let mut c = self.ctx.collector.lock().expect("collector lock");
            c.connected += 1;
            c.joined += 1;
            if let Some(ms) = self.times.signaling_ms {
                c.join_signaling.record((ms * 1000.0) as u64);
            }
        }
    }

    fn start_media(&mut self, peer: Arc<Peer>, mids: Vec<String>, remote: &RemoteDescription) {
        let ext = remote.ext_ids();
        let publish = self.spec.publish;
        let sender = self.spec.index;
        let collector = self.ctx.collector.clone();
        let stop = self.ctx.stop.clone();
        self.media = Some(self.ctx.pacer.handle.spawn(send_media(
            peer, publish, sender, mids, ext, collector, stop,
        )));
    }

    async fn run_ws(&mut self, identity: &str, token: &str) -> Result<(), ParticipantError> {
        let (ws, mut events) = WsClient::connect(&self.ctx.target).await?;
        let joined = ws
            .request(
                "room:join",
                json!({"token": token, "name": identity, "autoSubscribe": self.spec.subscribe}),
            )
            .await?;
        self.roster = Some(RosterView::from_ack(&joined));
        if self.spec.publish == Publish::None && !self.spec.subscribe {
            self.times.signaling_ms = ms(self.t0.elapsed());
            self.times.signaling_only = true;
        }
        if self.spec.publish != Publish::None {
            let (peer, ice, offer, mids) = self.publish_peer().await?;
            let video_source = if self.spec.publish == Publish::Screen {
                "screen"
            } else {
                "camera"
            };
            let has_video = self.spec.publish.video_layers() > 0;
            let tracks: Vec<Value> = mids
                .iter()
                .enumerate()
                .map(|(i, mid)| {
                    let source = if i == 0 && has_video {
                        video_source
                    } else {
                        "microphone"
                    };
                    json!({"mid": mid, "source": source})
                })
                .collect();
            let ack = ws
                .request("produce", json!({"sdp": offer, "tracks": tracks}))
                .await?;
            let answer = sdp::read_remote(ack["sdp"].as_str().unwrap_or_default())?;
            self.times.signaling_ms = ms(self.t0.elapsed());
            self.connect_peer(&peer, &ice, &answer).await?;
            self.start_media(peer, mids, &answer);
        }
        if !self.spec.subscribe {
            self.mark_connected();
        }
        let mut sub: Option<(Arc<Peer>, IceCredentials)> = None;
        // Video tracks received; each got `consumer:layers` if a max layer was set by then.
        let mut videos: HashSet<u64> = HashSet::new();
        let mut max_layer = self.spec.max_layer;
        let mut changes = self.spec.max_layer_changes.clone();
        let (conn_tx, mut conn_rx) = tokio::sync::mpsc::channel::<Result<(), ParticipantError>>(1);
        let mut stop = self.ctx.stop.clone();
        // Polls for the first media packet, and only until it came: a thousand idle viewers'
        // tasks then sleep until an event instead of waking five times a second each.
        let mut check = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = check.tick(), if self.times.first_media_ms.is_none() => {
                    if self.times.first_media_ms.is_none() {
                        if let Some(at) = sub.as_ref().and_then(|(p, _)| p.first_media()) {
                            self.times.first_media_ms = ms(at.duration_since(self.t0));
                        }
                    }
                }
                Some(done) = conn_rx.recv() => {
                    done?;
                    self.mark_connected();
                }
                Some(max) = next_max_layer(&mut changes) => {
                    max_layer = Some(max);
                    for id in &videos {
                        ws.request("consumer:layers", json!({"track": id, "maxSpatial": max})).await?;
                    }
                }
                ev = events.recv() => {
                    let Some(ev) = ev else { break };
                    if *self.ctx.stop.borrow() {
                        // The run is over: others' leaves from now on are not the room's size.
                        break;
                    }
                    if let Some(r) = self.roster.as_mut() {
                        r.on_event(&ev);
                    }
                    match ev["type"].as_str().unwrap_or_default() {
                        "sdp:offer" => {
                            let offer = sdp::read_remote(ev["sdp"].as_str().unwrap_or_default())?;
                            let first = sub.is_none();
                            if first {
                                let peer = Peer::bind(
                                    self.ctx.local_ip,
                                    Some(Receiver::new(self.ctx.nack, Instant::now())),
                                    self.ctx.collector.clone(),
                                    &self.ctx.ticker,
                                    self.hub(),
                                )
                                .await?;
                                self.peers.push(peer.clone());
                                sub = Some((peer, IceCredentials::random()));
                            }
                            let (peer, ice) = sub.as_ref().expect("set above");
                            let local = local_transport(peer, ice, &self.ctx.cert);
                            let answer = sdp::subscriber_answer(&offer, &local);
                            ws.request("sdp:answer", json!({"revision": ev["revision"], "sdp": answer})).await?;
                            if first {
                                if self.times.signaling_ms.is_none() {
                                    self.times.signaling_ms = ms(self.t0.elapsed());
                                }
                                // Connect in the background: later offers must be answered meanwhile.
                                let (peer, ice) = (peer.clone(), ice.clone());
                                let addr = self.remote_addr(&offer);
                                let cert = self.ctx.cert.clone();
                                let tx = conn_tx.clone();
                                let remote = offer.clone();
                                let times_slot = Arc::new(std::sync::Mutex::new(None));
                                let slot = times_slot.clone();
                                tokio::spawn(async move {
                                    let r = peer
                                        .connect(addr, &remote, &ice.ufrag, &cert, CONNECT_TIMEOUT)
                                        .await;
                                    if let Ok(t) = &r {
                                        *slot.lock().expect("slot") = Some(*t);
                                        peer.set_twcc_id(remote.ext_ids().twcc);
                                    }
                                    let _ = tx.send(r.map(|_| ()).map_err(ParticipantError::from)).await;
                                });
                                self.pending_times = Some(times_slot);
                            }
                            for t in ev["tracks"].as_array().into_iter().flatten() {
                                if t["kind"] == "video" {
                                    if let Some(id) = t["track"].as_u64() {
                                        if let (true, Some(max)) = (videos.insert(id), max_layer) {
                                            ws.request("consumer:layers", json!({"track": id, "maxSpatial": max})).await?;
                                        }
                                    }
                                }
                            }
                        }
                        "closed" => {
                            if *self.ctx.stop.borrow() {
                                break;
                            }
                            return Err(SignalingError::Closed(ev["reason"].as_str().unwrap_or("?").to_owned()).into());
                        }
                        "room:close" => {
                            return Err(ParticipantError::Server(format!("room closed: {}", ev["reason"])));
                        }
                        "transport:closed" => {
                            return Err(ParticipantError::Server(format!("server dropped a transport: {}", ev["reason"])));
                        }
                        _ => {}
                    }
                    self.take_pending_times();
                }
            }
            self.take_pending_times();
        }
        let _ =
            tokio::time::timeout(Duration::from_secs(2), ws.request("room:leave", json!({}))).await;
        ws.close().await;
        Ok(())
    }

    async fn run_whip(&mut self, token: &str) -> Result<(), ParticipantError> {
        let room = self.ctx.room.clone();
        if self.spec.publish != Publish::None {
            let (peer, ice, offer, mids) = self.publish_peer().await?;
            let answer =
                signaling::whip_whep(&self.ctx.target, &format!("/whip/{room}"), token, &offer)
                    .await?;
            let answer = sdp::read_remote(&answer)?;
            self.times.signaling_ms = ms(self.t0.elapsed());
            self.connect_peer(&peer, &ice, &answer).await?;
            self.start_media(peer, mids, &answer);
        }
        if self.spec.subscribe {
            let peer = Peer::bind(
                self.ctx.local_ip,
                Some(Receiver::new(self.ctx.nack, Instant::now())),
                self.ctx.collector.clone(),
                &self.ctx.ticker,
                self.hub(),
            )
            .await?;
            self.peers.push(peer.clone());
            let ice = IceCredentials::random();
            let offer = sdp::whep_offer(&local_transport(&peer, &ice, &self.ctx.cert));
            let answer =
                signaling::whip_whep(&self.ctx.target, &format!("/whep/{room}"), token, &offer)
                    .await?;
            let answer = sdp::read_remote(&answer)?;
            if self.times.signaling_ms.is_none() {
                self.times.signaling_ms = ms(self.t0.elapsed());
            }
            self.connect_peer(&peer, &ice, &answer).await?;
        }
        self.mark_connected();
        let mut stop = self.ctx.stop.clone();
        // Polls for the first media packet, and only until it came: a thousand idle viewers'
        // tasks then sleep until an event instead of waking five times a second each.
        let mut check = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = check.tick(), if self.times.first_media_ms.is_none() => {
                    if self.times.first_media_ms.is_none() {
                        if let Some(at) = self.peers.iter().find_map(|p| p.first_media()) {
                            self.times.first_media_ms = ms(at.duration_since(self.t0));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Janus VideoRoom: see [`crate::janus`] for the flow and what differs from the edge.
    async fn run_janus(&mut self, identity: &str) -> Result<(), ParticipantError> {
        let secret = match &self.ctx.tokens {
            TokenSource::Fixed(t) => Some(t.clone()),
            TokenSource::Dev | TokenSource::ControlPlane { .. } => None,
        };
        let (jc, mut events) = JanusClient::connect(&self.ctx.target, secret).await?;
        let result = self.janus_session(&jc, &mut events, identity).await;
        jc.close().await;
        result
    }

    async fn janus_session(
        &mut self,
        jc: &JanusClient,
        events: &mut tokio::sync::mpsc::Receiver<Value>,
        identity: &str,
    ) -> Result<(), ParticipantError> {
        let room = self.ctx.janus_room;
        let pub_handle = jc.attach().await?;
        let joined = jc
            .message(
                pub_handle,
                json!({"request": "join", "ptype": "publisher", "room": room, "display": identity}),
                None,
                true,
            )
            .await?;
        let mut feeds = publisher_ids(&joined["plugindata"]["data"]);
        if self.spec.publish != Publish::None {
            let (peer, ice, offer, mids) = self.publish_peer().await?;
            peer.answer_checks(&ice.pwd, true);
            // We stay the DTLS client: Janus answers an `actpass` offer as client itself.
            let offer = offer.replace("a=setup:actpass", "a=setup:active");
            let r = jc
                .message(
                    pub_handle,
                    json!({"request": "publish"}),
                    Some(json!({"type": "offer", "sdp": offer, "trickle": false, "rid_order": "lmh"})),
                    true,
                )
                .await?;
            let answer_sdp = r["jsep"]["sdp"].as_str().unwrap_or_default();
            tracing::debug!(
                participant = identity,
                "Janus publisher answer:\n{answer_sdp}"
            );
            let answer = sdp::read_remote(answer_sdp)?;
            self.times.signaling_ms = ms(self.t0.elapsed());
            self.connect_peer(&peer, &ice, &answer).await?;
            self.start_media(peer, mids, &answer);
        }
        if !self.spec.subscribe {
            self.mark_connected();
        }
        let mut sub: Option<JanusSub> = None;
        let (conn_tx, mut conn_rx) = tokio::sync::mpsc::channel::<Result<(), ParticipantError>>(1);
        let mut stop = self.ctx.stop.clone();
        // Polls for the first media packet, and only until it came: a thousand idle viewers'
        // tasks then sleep until an event instead of waking five times a second each.
        let mut check = tokio::time::interval(Duration::from_millis(200));
        loop {
            if self.spec.subscribe && !feeds.is_empty() {
                let new = std::mem::take(&mut feeds);
                self.janus_subscribe(jc, &mut sub, new, &conn_tx).await?;
            }
            tokio::select! {
                _ = stop.changed() => break,
                _ = check.tick(), if self.times.first_media_ms.is_none() => {
                    if self.times.first_media_ms.is_none() {
                        if let Some(at) = sub.as_ref().and_then(|s| s.peer.first_media()) {
                            self.times.first_media_ms = ms(at.duration_since(self.t0));
                        }
                    }
                }
                Some(done) = conn_rx.recv() => {
                    done?;
                    self.mark_connected();
                }
                ev = events.recv() => {
                    let Some(ev) = ev else { break };
                    match ev["janus"].as_str().unwrap_or_default() {
                        "event" => {
                            let data = &ev["plugindata"]["data"];
                            if ev["sender"].as_u64() == Some(pub_handle) {
                                feeds.extend(publisher_ids(data));
                            } else if let (Some(s), Some(offer)) = (sub.as_mut(), ev["jsep"]["sdp"].as_str()) {
                                // Janus re-offers on its own (e.g. a feed went away).
                                let offer = sdp::read_remote(offer)?;
                                self.janus_answer(jc, s, &offer).await?;
                            }
                        }
                        "hangup" => {
                            if *self.ctx.stop.borrow() {
                                break;
                            }
                            return Err(ParticipantError::Server(format!("Janus hung up a peer connection: {}", ev["reason"])));
                        }
                        "timeout" | "detached" => {
                            return Err(ParticipantError::Server(format!("Janus ended the session ({})", ev["janus"])));
                        }
                        "closed" => {
                            if *self.ctx.stop.borrow() {
                                break;
                            }
                            return Err(SignalingError::Closed(ev["reason"].as_str().unwrap_or("?").to_owned()).into());
                        }
                        _ => {}
                    }
                }
            }
            self.take_pending_times();
        }
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            jc.message(pub_handle, json!({"request": "leave"}), None, false),
        )
        .await;
        Ok(())
    }

    /// Subscribes to `feeds`: the first time by joining as subscriber (which makes the peer
    /// connection, connected in the background), later with `subscribe` (Janus re-offers).
    async fn janus_subscribe(
        &mut self,
        jc: &JanusClient,
        sub: &mut Option<JanusSub>,
        feeds: Vec<u64>,
        conn_tx: &tokio::sync::mpsc::Sender<Result<(), ParticipantError>>,
    ) -> Result<(), ParticipantError> {
        let streams: Vec<Value> = feeds.iter().map(|f| json!({"feed": f})).collect();
        let reply = match sub.as_ref() {
            Some(s) => {
                jc.message(
                    s.handle,
                    json!({"request": "subscribe", "streams": streams}),
                    None,
                    true,
                )
                .await?
            }
            None => {
                let handle = jc.attach().await?;
                let r = jc
                    .message(
                        handle,
                        json!({"request": "join", "ptype": "subscriber", "room": self.ctx.janus_room, "streams": streams}),
                        None,
                        true,
                    )
                    .await?;
                let peer = Peer::bind(
                    self.ctx.local_ip,
                    Some(Receiver::new(self.ctx.nack, Instant::now())),
                    self.ctx.collector.clone(),
                    &self.ctx.ticker,
                    self.hub(),
                )
                .await?;
                self.peers.push(peer.clone());
                let ice = IceCredentials::random();
                peer.answer_checks(&ice.pwd, false);
                *sub = Some(JanusSub {
                    handle,
                    peer,
                    ice,
                    connecting: false,
                    layered: HashSet::new(),
                });
                r
            }
        };
        let Some(offer) = reply["jsep"]["sdp"].as_str() else {
            return Ok(());
        };
        tracing::debug!(
            room = self.ctx.janus_room,
            "Janus subscriber offer:\n{offer}"
        );
        let offer = sdp::read_remote(offer)?;
        let s = sub.as_mut().expect("set above");
        self.janus_answer(jc, s, &offer).await?;
        if !s.connecting {
            s.connecting = true;
            if self.times.signaling_ms.is_none() {
                self.times.signaling_ms = ms(self.t0.elapsed());
            }
            let (peer, ice) = (s.peer.clone(), s.ice.clone());
            let addr = self.remote_addr(&offer);
            let cert = self.ctx.cert.clone();
            let tx = conn_tx.clone();
            let times_slot = Arc::new(std::sync::Mutex::new(None));
            let slot = times_slot.clone();
            tokio::spawn(async move {
                let r = peer
                    .connect(addr, &offer, &ice.ufrag, &cert, CONNECT_TIMEOUT)
                    .await;
                if let Ok(t) = &r {
                    *slot.lock().expect("slot") = Some(*t);
                    peer.set_twcc_id(offer.ext_ids().twcc);
                }
                let _ = tx.send(r.map(|_| ()).map_err(ParticipantError::from)).await;
            });
            self.pending_times = Some(times_slot);
        }
        Ok(())
    }

    /// Answers Janus's subscriber offer (`start`), then asks for the wanted simulcast layer
    /// on each new video mid.
    async fn janus_answer(
        &mut self,
        jc: &JanusClient,
        s: &mut JanusSub,
        offer: &RemoteDescription,
    ) -> Result<(), ParticipantError> {
        let local = local_transport(&s.peer, &s.ice, &self.ctx.cert);
        let answer = sdp::subscriber_answer(offer, &local);
        jc.message(
            s.handle,
            json!({"request": "start"}),
            Some(json!({"type": "answer", "sdp": answer, "trickle": false})),
            true,
        )
        .await?;
        if let Some(max) = self.spec.max_layer {
            let mids: Vec<Value> = offer
                .media
                .iter()
                .filter(|m| m.kind == "video" && m.port != 0)
                .filter_map(|m| m.mid.clone())
                .filter(|mid| s.layered.insert(mid.clone()))
                .map(|mid| json!({"mid": mid, "substream": max}))
                .collect();
            if !mids.is_empty() {
                jc.message(
                    s.handle,
                    json!({"request": "configure", "streams": mids}),
                    None,
                    true,
                )
                .await?;
            }
        }
        Ok(())
    }

    async fn finish(&mut self) {
        if let Some(m) = self.media.take() {
            m.abort();
        }
        for p in self.peers.drain(..) {
            p.close().await;
        }
        let mut c = self.ctx.collector.lock().expect("collector lock");
        if self.counted_connected {
            c.connected -= 1;
        }
        c.joins.push(self.times);
        if let Some(r) = self.roster.take() {
            c.signaling_events += r.events;
            c.presence_entries += r.entries;
            c.roster_views.push(r.count());
        }
    }
}

/// A participant's Janus subscriber handle and its one peer connection.
struct JanusSub {
    handle: u64,
    peer: Arc<Peer>,
    ice: IceCredentials,
    connecting: bool,
    /// Video mids whose substream was set.
    layered: HashSet<String>,
}

/// Feed ids in a VideoRoom `joined` or `event` message's `publishers` list.
fn publisher_ids(data: &Value) -> Vec<u64> {
    data["publishers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

/// Sends the participant's audio and video on schedule until stopped; records its own lag.
async fn send_media(
    peer: Arc<Peer>,
    publish: Publish,
    sender: u32,
    mids: Vec<String>,
    ext: sdp::ExtIds,
    collector: Shared,
    mut stop: watch::Receiver<bool>,
) {
    let now = Instant::now();
    let mut audio = publish.audio().then(|| AudioSource::new(sender, now));
    let profile = if publish == Publish::Screen {
        VideoProfile::screen()
    } else {
        VideoProfile::camera(publish.video_layers())
    };
    let mut video = (publish.video_layers() > 0).then(|| VideoSource::new(sender, profile, now));
    let audio_ssrc: u32 = rand::random();
    let video_ssrcs: Vec<u32> = (0..3).map(|_| rand::random()).collect();
    let mut ssrcs = vec![(audio_ssrc, 255u8)];
    ssrcs.extend(video_ssrcs.iter().enumerate().map(|(i, &s)| (s, i as u8)));
    peer.set_sender_ssrcs(ssrcs);
    let mut seqs: Vec<u16> = (0..4).map(|_| rand::random()).collect();
    let mut twcc: u16 = 0;
    // Video (when sent) is the first m-section, audio the last: see sdp::publish_offer.
    let video_mid = mids.first().cloned().unwrap_or_default();
    let audio_mid = mids.last().cloned().unwrap_or_default();
    let simulcast = publish.video_layers() > 1;
    let mut buf = Vec::with_capacity(1500);
    // What this wakeup produced, encrypted, sent with one `sendmmsg`.
    let mut batch: Vec<bytes::Bytes> = Vec::new();
    let mut lags: Vec<u64> = Vec::new();
    let mut last_flush = Instant::now();
    loop {
        let due = [
            audio.as_ref().map(|a| a.next_due()),
            video.as_ref().map(|v| v.next_due()),
        ]
        .into_iter()
        .flatten()
        .min();
        let Some(due) = due else { return };
        tokio::select! {
            _ = tokio::time::sleep_until(due.into()) => {}
            _ = stop.changed() => return,
        }
        let now = Instant::now();
        let lag = now.saturating_duration_since(due);
        lags.push(lag.as_micros() as u64);
        if let Some(v) = video.as_mut() {
            for layer in peer.take_keyframe_requests() {
                v.request_keyframe(layer);
            }
        }
        if let Some(a) = audio.as_mut() {
            if lag > MAX_CATCH_UP {
                *a = AudioSource::new(sender, now);
            }
            while a.next_due() <= now {
                let p = a.poll(now);
                let seq = seqs[0];
                seqs[0] = seqs[0].wrapping_add(1);
                twcc = twcc.wrapping_add(1);
                write_rtp(
                    &mut buf,
                    RtpHeader {
                        pt: PT_OPUS,
                        marker: p.marker,
                        seq,
                        timestamp: p.timestamp,
                        ssrc: audio_ssrc,
                    },
                    OutExt {
                        audio_level: ext.audio_level.zip(p.audio_level),
                        twcc: ext.twcc.map(|id| (id, twcc)),
                        mid: ext.mid.map(|id| (id, audio_mid.as_str())),
                        rid: None,
                    },
                    &p.payload,
                );
                batch.extend(peer.protect_rtp(&buf, audio_ssrc, seq));
            }
        }
        if let Some(v) = video.as_mut() {
            if lag > MAX_CATCH_UP {
                *v = VideoSource::new(sender, profile, now);
            }
            while v.next_due() <= now {
                for p in v.poll(now) {
                    let l = usize::from(p.layer);
                    let seq = seqs[1 + l];
                    seqs[1 + l] = seq.wrapping_add(1);
                    twcc = twcc.wrapping_add(1);
                    write_rtp(
                        &mut buf,
                        RtpHeader {
                            pt: PT_VP8,
                            marker: p.marker,
                            seq,
                            timestamp: p.timestamp,
                            ssrc: video_ssrcs[l],
                        },
                        OutExt {
                            audio_level: None,
                            twcc: ext.twcc.map(|id| (id, twcc)),
                            mid: ext.mid.map(|id| (id, video_mid.as_str())),
                            rid: if simulcast {
                                ext.rid.map(|id| (id, RIDS[l]))
                            } else {
                                None
                            },
                        },
                        &p.payload,
                    );
                    batch.extend(peer.protect_rtp(&buf, video_ssrcs[l], seq));
                }
            }
        }
        peer.send_rtp_batch(&batch).await;
        batch.clear();
        if now.duration_since(last_flush) >= Duration::from_millis(100) {
            last_flush = now;
            let mut c = collector.lock().expect("collector lock");
            for l in lags.drain(..) {
                c.record_lag(l);
            }
        }
    }
}
