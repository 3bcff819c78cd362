//! Cascade links over QUIC (quinn), the thin async shell around [`crate::wire`].
//!
//! A [`LinkEndpoint`] binds one UDP socket, dials peers ([`LinkEndpoint::connect`]) and accepts
//! them ([`LinkEndpoint::accept`] then [`PendingLink::handshake`], so a slow peer's handshake
//! never holds up the next one). A handshake is mutual TLS ([`tls`]) with ALPN
//! [`crate::link::ALPN`], then the hello exchange on the control stream: the dialler sends its
//! [`Hello`], the listener checks it ([`Hello::check_peer`]; the dialler's certificate must name
//! the node id it claims) and answers with its own. A refusal is a QUIC connection close whose
//! code and reason are the [`Refusal`]'s, so the refused side reads why.
//!
//! After the handshake a [`Link`] is split into its control stream halves and its media
//! datagrams: one task can own each. A frame that does not decode closes the control stream
//! only: [`ControlReceiver::recv`] stops the stream with the [`WireError::code`] and returns the
//! error; the owner of the [`ControlSender`] then calls [`ControlSender::refuse`] to send the
//! reason as a goodbye and finish the stream. The QUIC connection, its datagrams and every other
//! link stay up.
//!
//! One control stream per link is enforced by QUIC itself: each side allows its peer one open
//! bidirectional stream and no unidirectional ones.

mod relay_node;
pub mod tls;

use crate::link::{ControlMessage, GoodbyeCode, Hello, MediaDatagram, Refusal};
use crate::wire::{self, FrameDecoder, WireError, DEFAULT_MAX_FRAME_BODY};
use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
pub use relay_node::RelayNode;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
pub use tls::{ClusterCa, NodeCredentials, TlsError};

/// Largest chunk read from the control stream at once.
const READ_CHUNK: usize = 64 * 1024;

/// Default of [`LinkConfig::initial_window`]: 16 MiB.
pub const DEFAULT_INITIAL_WINDOW: u64 = 16 << 20;

/// Plain data for a [`LinkEndpoint`], with the defaults documented.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// What this node says in its hello.
    pub hello: Hello,
    /// TLS handshake plus hello exchange must finish within this (default 5 s: a few round
    /// trips on the slowest inter-region path, with room for a loaded peer).
    pub handshake_timeout: Duration,
    /// QUIC keep-alive (default 500 ms): the idle timeout below needs traffic to measure.
    pub keep_alive: Duration,
    /// A peer silent this long is dead (default 3 s). Bounds how fast a link failure is noticed:
    /// children re-parent after it, so it is short, yet several keep-alives long.
    pub idle_timeout: Duration,
    /// Keep-alive of links dialled with [`LinkEndpoint::connect_tree`] (default 150 ms).
    pub tree_keep_alive: Duration,
    /// Idle timeout of links dialled with [`LinkEndpoint::connect_tree`] (default 750 ms): a
    /// child edge's link to its parent edge. QUIC uses the smaller of the two sides' idle
    /// timeouts, so the dialler alone decides, and both ends notice a silent peer within it.
    /// Short because the child falls back to the origin when it fires and media must resume
    /// within 2 s; five keep-alives long so a busy peer is not declared dead.
    pub tree_idle_timeout: Duration,
    /// Largest control frame body accepted (default [`DEFAULT_MAX_FRAME_BODY`]).
    pub max_frame_body: usize,
    /// Datagrams buffered per link before the oldest are dropped (default 4 MiB: about 1.3 s of
    /// 25 Mbit/s of media, enough to ride out a scheduling hiccup).
    pub datagram_buffer: usize,
    /// The congestion window a link's QUIC connection starts with (default
    /// [`DEFAULT_INITIAL_WINDOW`], 16 MiB; Cubic from there, so loss still shrinks it).
    ///
    /// Why so large: quinn paces what it sends at 1.25 windows per round trip, in bursts of the
    /// window's 2 ms share (at least 10 packets). With QUIC's usual start (about 14 KB,
    /// growing only while the sender is not application-limited, which media almost always
    /// is) a keyframe (20-40 KB, more for a screen) on a 100-250 ms inter-region link was
    /// spread over milliseconds at every hop: in the multi-region bench, 2-4 ms of the
    /// receivers' p99 (BENCHMARKS.md). The cascade's rate is set by the media layer (each
    /// publisher's congestion control, the simulcast layers the receivers behind a link
    /// demand), not by QUIC: its datagrams are never retransmitted, so QUIC's window only
    /// decides whether a burst queues. At 16 MiB a 40 KB burst leaves at once on links up to
    /// ~800 ms round trip, and pacing only bites above ~500 Mbit/s on a 300 ms link.
    pub initial_window: u64,
}

impl LinkConfig {
    pub fn new(hello: Hello) -> Self {
        Self {
            hello,
            handshake_timeout: Duration::from_secs(5),
            keep_alive: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(3),
            tree_keep_alive: Duration::from_millis(150),
            tree_idle_timeout: Duration::from_millis(750),
            max_frame_body: DEFAULT_MAX_FRAME_BODY,
            datagram_buffer: 4 << 20,
            initial_window: DEFAULT_INITIAL_WINDOW,
        }
    }

    fn transport(&self) -> Result<quinn::TransportConfig, LinkError> {
        self.transport_with(self.keep_alive, self.idle_timeout)
    }

    fn transport_with(
        &self,
        keep_alive: Duration,
        idle_timeout: Duration,
    ) -> Result<quinn::TransportConfig, LinkError> {
        let mut t = quinn::TransportConfig::default();
        t.keep_alive_interval(Some(keep_alive));
        t.max_idle_timeout(Some(
            idle_timeout
                .try_into()
                .map_err(|_| LinkError::Config("idle timeout too large"))?,
        ));
        t.max_concurrent_bidi_streams(1u8.into());
        t.max_concurrent_uni_streams(0u8.into());
        t.datagram_receive_buffer_size(Some(self.datagram_buffer));
        t.datagram_send_buffer_size(self.datagram_buffer);
        let mut cubic = quinn::congestion::CubicConfig::default();
        cubic.initial_window(self.initial_window);
        t.congestion_controller_factory(Arc::new(cubic));
        Ok(t)
    }
}

/// Why a link could not be set up or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    #[error("link configuration: {0}")]
    Config(&'static str),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot bind the link socket: {0}")]
    Bind(std::io::Error),
    #[error("cannot dial: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was closed (a TLS refusal, a timeout, a reset).
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The peer (or we) refused the link at hello, with its reason.
    #[error("link refused ({code:?}): {reason}")]
    Refused { code: GoodbyeCode, reason: String },
    #[error("handshake did not finish within {0:?}")]
    HandshakeTimeout(Duration),
    /// The peer broke the wire format; the control stream is stopped.
    #[error("peer sent a malformed frame: {0}")]
    Malformed(WireError),
    /// The peer stopped or finished the control stream.
    #[error("control stream closed by the peer")]
    StreamClosed,
    #[error("control stream write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("control stream read: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("message cannot be sent: {0}")]
    Encode(WireError),
    #[error("datagram: {0}")]
    Datagram(#[from] quinn::SendDatagramError),
}

impl LinkError {
    /// A connection closed by the peer's refusal reads as [`LinkError::Refused`].
    fn from_connection(e: quinn::ConnectionError) -> Self {
        match e {
            quinn::ConnectionError::ApplicationClosed(close) => LinkError::Refused {
                code: GoodbyeCode::from_u16(
                    u16::try_from(close.error_code.into_inner()).unwrap_or(u16::MAX),
                ),
                reason: String::from_utf8_lossy(&close.reason).into_owned(),
            },
            e => LinkError::Connection(e),
        }
    }

    fn from_read(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::ConnectionLost(c) => Self::from_connection(c),
            quinn::ReadError::Reset(_) => LinkError::StreamClosed,
            e => LinkError::Read(e),
        }
    }

    fn from_write(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::ConnectionLost(c) => Self::from_connection(c),
            quinn::WriteError::Stopped(_) => LinkError::StreamClosed,
            e => LinkError::Write(e),
        }
    }
}

/// One UDP socket for all of a node's links, dialling and listening.
pub struct LinkEndpoint {
    endpoint: quinn::Endpoint,
    config: Arc<LinkConfig>,
    /// Client side for [`LinkEndpoint::connect_tree`]: the same TLS, faster loss detection.
    tree_client: quinn::ClientConfig,
}

impl LinkEndpoint {
    /// Binds `addr` (port 0 picks one) with this node's credentials. Needs a tokio runtime.
    pub fn bind(
        addr: SocketAddr,
        credentials: &NodeCredentials,
        config: LinkConfig,
    ) -> Result<Self, LinkError> {
        let transport = Arc::new(config.transport()?);
        let server_crypto = QuicServerConfig::try_from(credentials.server_config()?)
            .map_err(|_| LinkError::Config("TLS server configuration lacks a QUIC cipher suite"))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(transport.clone());
        let client_crypto = QuicClientConfig::try_from(credentials.client_config()?)
            .map_err(|_| LinkError::Config("TLS client configuration lacks a QUIC cipher suite"))?;
        let client_crypto = Arc::new(client_crypto);
        let mut client = quinn::ClientConfig::new(client_crypto.clone());
        client.transport_config(transport);
        let mut tree_client = quinn::ClientConfig::new(client_crypto);
        tree_client.transport_config(Arc::new(
            config.transport_with(config.tree_keep_alive, config.tree_idle_timeout)?,
        ));
        let mut endpoint = quinn::Endpoint::server(server, addr).map_err(LinkError::Bind)?;
        endpoint.set_default_client_config(client);
        Ok(Self {
            endpoint,
            config: Arc::new(config),
            tree_client,
        })
    }

    /// What this node says in its hello (its node id, region and role).
    pub fn hello(&self) -> &Hello {
        &self.config.hello
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Dials the node `peer` at `addr`. Its certificate must name `peer`, its hello must too.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        peer: &crate::link::Label,
    ) -> Result<Link, LinkError> {
        self.connect_with(None, addr, peer).await
    }

    /// Dials a parent edge of a room's fan-out tree: as [`connect`](Self::connect), with the
    /// link's keep-alive and idle timeout from [`LinkConfig::tree_keep_alive`] and
    /// [`LinkConfig::tree_idle_timeout`], so a dead parent is noticed in well under a second.
    pub async fn connect_tree(
        &self,
        addr: SocketAddr,
        peer: &crate::link::Label,
    ) -> Result<Link, LinkError> {
        self.connect_with(Some(self.tree_client.clone()), addr, peer)
            .await
    }

    async fn connect_with(
        &self,
        client: Option<quinn::ClientConfig>,
        addr: SocketAddr,
        peer: &crate::link::Label,
    ) -> Result<Link, LinkError> {
        let timeout = self.config.handshake_timeout;
        let attempt = async {
            let connecting = match client {
                Some(c) => self.endpoint.connect_with(c, addr, peer.as_str())?,
                None => self.endpoint.connect(addr, peer.as_str())?,
            };
            let conn = connecting.await.map_err(LinkError::from_connection)?;
            let (mut send, recv) = conn.open_bi().await.map_err(LinkError::from_connection)?;
            write_message(&mut send, &ControlMessage::Hello(self.config.hello.clone())).await?;
            let mut receiver = ControlReceiver::new(recv, self.config.max_frame_body);
            let first = receiver.recv().await?;
            let refusal = match &first {
                ControlMessage::Hello(h) if h.node != *peer => Some(Refusal {
                    code: GoodbyeCode::BadHello,
                    reason: format!("dialled node {peer} but its hello names {}", h.node),
                }),
                ControlMessage::Hello(h) => self.config.hello.check_peer(h).err(),
                ControlMessage::Goodbye { code, reason } => {
                    return Err(LinkError::Refused {
                        code: *code,
                        reason: reason.clone(),
                    })
                }
                other => Some(Refusal {
                    code: GoodbyeCode::BadHello,
                    reason: format!("expected hello, got {}", other.name()),
                }),
            };
            if let Some(r) = refusal {
                return Err(refuse(&conn, r));
            }
            let ControlMessage::Hello(peer_hello) = first else {
                unreachable!("every other first message was refused above")
            };
            Ok(Link::new(conn, send, receiver, peer_hello))
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .map_err(|_| LinkError::HandshakeTimeout(timeout))?
    }

    /// The next incoming connection attempt, or `None` once the endpoint is closed.
    pub async fn accept(&self) -> Option<PendingLink> {
        let incoming = self.endpoint.accept().await?;
        Some(PendingLink {
            incoming,
            config: self.config.clone(),
        })
    }

    /// Closes every link of this endpoint with a goodbye code and reason.
    pub fn close(&self, code: GoodbyeCode, reason: &str) {
        self.endpoint
            .close(u32::from(code.to_u16()).into(), reason.as_bytes());
    }

    /// Waits until every connection of the endpoint is closed (after [`close`](Self::close)).
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }
}

/// Closes the connection with the refusal's code and reason; returns it as the error.
fn refuse(conn: &quinn::Connection, r: Refusal) -> LinkError {
    tracing::warn!(remote = %conn.remote_address(), code = ?r.code, reason = %r.reason, "cascade link refused");
    conn.close(u32::from(r.code.to_u16()).into(), r.reason.as_bytes());
    LinkError::Refused {
        code: r.code,
        reason: r.reason,
    }
}

/// An incoming connection before its handshake.
pub struct PendingLink {
    incoming: quinn::Incoming,
    config: Arc<LinkConfig>,
}

impl PendingLink {
    pub fn remote_address(&self) -> SocketAddr {
        self.incoming.remote_address()
    }

    /// Completes TLS and the hello exchange; refuses (closing with the reason) a peer whose
    /// certificate, hello or version does not fit.
    pub async fn handshake(self) -> Result<Link, LinkError> {
        let timeout = self.config.handshake_timeout;
        let config = self.config;
        let attempt = async move {
            let conn = self.incoming.await.map_err(LinkError::from_connection)?;
            let (send, recv) = conn.accept_bi().await.map_err(LinkError::from_connection)?;
            let mut receiver = ControlReceiver::new(recv, config.max_frame_body);
            let first = match receiver.recv().await {
                Ok(m) => m,
                Err(LinkError::Malformed(e)) => {
                    return Err(refuse(
                        &conn,
                        Refusal {
                            code: GoodbyeCode::BadHello,
                            reason: format!("first frame does not decode: {e}"),
                        },
                    ))
                }
                Err(e) => return Err(e),
            };
            let ControlMessage::Hello(peer) = first else {
                return Err(refuse(
                    &conn,
                    Refusal {
                        code: GoodbyeCode::BadHello,
                        reason: format!("expected hello, got {}", first.name()),
                    },
                ));
            };
            if !peer_certificate_names(&conn, &peer) {
                return Err(refuse(
                    &conn,
                    Refusal {
                        code: GoodbyeCode::BadHello,
                        reason: format!(
                            "hello names node {} but the certificate does not",
                            peer.node
                        ),
                    },
                ));
            }
            if let Err(r) = config.hello.check_peer(&peer) {
                return Err(refuse(&conn, r));
            }
            tracing::info!(remote = %conn.remote_address(), node = %peer.node, region = %peer.region, role = peer.role.as_str(), "cascade link accepted");
            let mut link = Link::new(conn, send, receiver, peer);
            link.sender
                .send(&ControlMessage::Hello(config.hello.clone()))
                .await?;
            Ok(link)
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .map_err(|_| LinkError::HandshakeTimeout(timeout))?
    }
}

fn peer_certificate_names(conn: &quinn::Connection, hello: &Hello) -> bool {
    conn.peer_identity()
        .and_then(|id| {
            id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|chain| {
            chain
                .first()
                .map(|leaf| tls::certificate_names(leaf, &hello.node))
        })
        .unwrap_or(false)
}

async fn write_message(
    send: &mut quinn::SendStream,
    msg: &ControlMessage,
) -> Result<(), LinkError> {
    let mut buf = Vec::new();
    wire::encode_frame(msg, &mut buf).map_err(LinkError::Encode)?;
    send.write_all(&buf).await.map_err(LinkError::from_write)
}

/// An established link: the peer's hello, the control stream halves and the datagrams.
pub struct Link {
    pub peer: Hello,
    pub sender: ControlSender,
    pub receiver: ControlReceiver,
    pub media: MediaChannel,
}

impl Link {
    fn new(
        conn: quinn::Connection,
        send: quinn::SendStream,
        receiver: ControlReceiver,
        peer: Hello,
    ) -> Self {
        Self {
            peer,
            sender: ControlSender {
                send,
                buf: Vec::new(),
            },
            receiver,
            media: MediaChannel { conn },
        }
    }

    pub fn remote_address(&self) -> SocketAddr {
        self.media.conn.remote_address()
    }
}

/// The sending half of the control stream.
pub struct ControlSender {
    send: quinn::SendStream,
    buf: Vec<u8>,
}

impl ControlSender {
    pub async fn send(&mut self, msg: &ControlMessage) -> Result<(), LinkError> {
        self.buf.clear();
        wire::encode_frame(msg, &mut self.buf).map_err(LinkError::Encode)?;
        self.send
            .write_all(&self.buf)
            .await
            .map_err(LinkError::from_write)
    }

    /// Writes bytes as they are, framed or not: for tests and tools that probe a peer's
    /// decoder. Nodes send typed messages with [`send`](Self::send).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), LinkError> {
        self.send
            .write_all(bytes)
            .await
            .map_err(LinkError::from_write)
    }

    /// Tells the peer why its frames were refused (a goodbye with the error's text) and
    /// finishes the stream; the connection stays open.
    pub async fn refuse(&mut self, error: &WireError) -> Result<(), LinkError> {
        let goodbye = ControlMessage::Goodbye {
            code: GoodbyeCode::ProtocolError,
            reason: format!("control stream closed (code 0x{:x}): {error}", error.code()),
        };
        self.send(&goodbye).await?;
        self.send.finish().map_err(|_| LinkError::StreamClosed)
    }

    /// Ends the stream after a last goodbye.
    pub async fn goodbye(&mut self, code: GoodbyeCode, reason: &str) -> Result<(), LinkError> {
        self.send(&ControlMessage::Goodbye {
            code,
            reason: reason.to_owned(),
        })
        .await?;
        self.send.finish().map_err(|_| LinkError::StreamClosed)
    }
}

/// The receiving half of the control stream.
pub struct ControlReceiver {
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
}

impl ControlReceiver {
    fn new(recv: quinn::RecvStream, max_frame_body: usize) -> Self {
        Self {
            recv,
            decoder: FrameDecoder::new(max_frame_body),
        }
    }

    /// The next control message. On a malformed frame the stream is stopped with the error's
    /// code and [`LinkError::Malformed`] returned (see the module docs). Cancel-safe: bytes
    /// already read stay in the decoder.
    pub async fn recv(&mut self) -> Result<ControlMessage, LinkError> {
        loop {
            match self.decoder.poll_message() {
                Ok(Some(msg)) => return Ok(msg),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, code = e.code(), "malformed cascade control frame; stopping the stream");
                    let _ = self.recv.stop(e.code().into());
                    return Err(LinkError::Malformed(e));
                }
            }
            match self.recv.read_chunk(READ_CHUNK, true).await {
                Ok(Some(chunk)) => self.decoder.push(&chunk.bytes),
                Ok(None) => return Err(LinkError::StreamClosed),
                Err(e) => return Err(LinkError::from_read(e)),
            }
        }
    }
}

/// Media datagrams of a link. Cheap to clone (one per forwarding task is fine).
#[derive(Clone)]
pub struct MediaChannel {
    conn: quinn::Connection,
}

impl MediaChannel {
    /// Sends one datagram. Dropped by QUIC when the send buffer is full (media is live: old
    /// packets are worth less than new ones).
    pub fn send(&self, datagram: &MediaDatagram<'_>) -> Result<(), LinkError> {
        let mut buf =
            Vec::with_capacity(wire::datagram_header_len(datagram.flow) + datagram.rtp.len());
        wire::encode_datagram(datagram, &mut buf);
        self.conn.send_datagram(Bytes::from(buf))?;
        Ok(())
    }

    /// Sends one datagram already encoded by [`wire::encode_datagram`] (as the relay and the
    /// edge's shards queue them). Dropped by QUIC when the send buffer is full.
    pub fn send_encoded(&self, datagram: &[u8]) -> Result<(), LinkError> {
        self.conn.send_datagram(Bytes::copy_from_slice(datagram))?;
        Ok(())
    }

    /// The next datagram's bytes; parse with [`wire::decode_datagram`] (a bad one is dropped and
    /// counted by the caller, never fatal).
    pub async fn recv(&self) -> Result<Bytes, LinkError> {
        self.conn
            .read_datagram()
            .await
            .map_err(LinkError::from_connection)
    }

    /// Largest datagram the path carries now (header included), if datagrams are enabled.
    pub fn max_size(&self) -> Option<usize> {
        self.conn.max_datagram_size()
    }

    /// Smoothed round-trip time of the link.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    /// The link's congestion window now, in bytes (see [`LinkConfig::initial_window`]).
    pub fn congestion_window(&self) -> u64 {
        self.conn.stats().path.cwnd
    }

    /// Closes the whole link with a goodbye code and reason.
    pub fn close(&self, code: GoodbyeCode, reason: &str) {
        self.conn
            .close(u32::from(code.to_u16()).into(), reason.as_bytes());
    }

    /// Resolves when the connection is closed, with why.
    pub async fn closed(&self) -> LinkError {
        LinkError::from_connection(self.conn.closed().await)
    }
}
