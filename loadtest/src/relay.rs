//! A userspace UDP delay relay: `loadtest relay --delay 20ms --jitter 2ms --loss 1%`.
//!
//! Why: this kernel has no netem, and operators want to see how a deployment behaves with
//! distance between clients and edge. Clients send to `listen`; each client address gets its own
//! upstream socket towards `upstream` (so the server sees one 5-tuple per client, as with a
//! NAT), and replies go back the same way. Every datagram, both directions, is held for
//! `delay` ± uniform `jitter` and dropped with probability `loss`. Per flow the order is kept
//! (a datagram never leaves before the one ahead of it), as on a real path where jitter comes
//! from queueing.
//!
//! Structure: one receive task per socket feeds one scheduler thread through a bounded channel;
//! the scheduler holds a deadline-ordered heap and sends when due. When the channel is full the
//! datagram is dropped and counted, like a full router queue.
//!
//! Why a thread for the scheduler: the relay stands for the network, so its delay should be the
//! configured one. A tokio timer has millisecond ticks and fires at the first tick at or after
//! the deadline, which added 0-1 ms (about 0.5 ms on average, more under load) to every
//! datagram at every relay, and the multi-region bench has two relays on each remote path. The
//! thread waits with `recv_timeout` (a futex with a high-resolution timeout) and sends with
//! plain `send_to` on its own handle of each socket.

use rand::Rng;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::task::JoinSet;

#[derive(Debug, Clone, Copy)]
pub struct RelayConfig {
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
    pub delay: Duration,
    pub jitter: Duration,
    /// Drop probability, 0..=1.
    pub loss: f64,
}

/// Counters, readable while the relay runs.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub forwarded: AtomicU64,
    pub dropped_loss: AtomicU64,
    pub dropped_queue: AtomicU64,
}

/// Queue depth between receivers and the scheduler: ~1 s of a few hundred Mbit/s.
const QUEUE: usize = 65_536;

/// How long the scheduler waits for a full socket buffer to drain before it drops a datagram.
const SEND_WAIT_MS: i32 = 20;

/// A socket as the receive task (tokio) and the scheduler thread (blocking calls) each hold it:
/// two handles of one file, non-blocking.
fn socket_pair(
    sock: std::net::UdpSocket,
) -> std::io::Result<(UdpSocket, Arc<std::net::UdpSocket>)> {
    sock.set_nonblocking(true)?;
    let sender = sock.try_clone()?;
    Ok((UdpSocket::from_std(sock)?, Arc::new(sender)))
}

struct Item {
    due: Instant,
    order: u64,
    out: Arc<std::net::UdpSocket>,
    to: SocketAddr,
    data: Vec<u8>,
}

impl PartialEq for Item {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.order) == (o.due, o.order)
    }
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Item {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.due, self.order).cmp(&(o.due, o.order))
    }
}

/// Binds the listening socket; returns its address and a future that runs the relay until it
/// is dropped (the scheduler thread then ends with the receive tasks).
pub async fn start(
    cfg: RelayConfig,
    stats: Arc<RelayStats>,
) -> std::io::Result<(SocketAddr, impl std::future::Future<Output = ()>)> {
    let (listen, listen_out) = socket_pair(std::net::UdpSocket::bind(cfg.listen)?)?;
    let addr = listen.local_addr()?;
    Ok((addr, run(cfg, listen, listen_out, stats)))
}

/// What a receive task hands the scheduler: (arrival, flow key, out socket, destination, data).
type Received = (Instant, u64, Arc<std::net::UdpSocket>, SocketAddr, Vec<u8>);

/// Hands a datagram to the scheduler, or counts it dropped when the queue is full.
fn enqueue(tx: &SyncSender<Received>, item: Received, stats: &RelayStats) {
    if let Err(TrySendError::Full(_)) = tx.try_send(item) {
        stats.dropped_queue.fetch_add(1, Ordering::Relaxed);
    }
}

async fn run(
    cfg: RelayConfig,
    listen: UdpSocket,
    listen_out: Arc<std::net::UdpSocket>,
    stats: Arc<RelayStats>,
) {
    let (tx, rx) = mpsc::sync_channel::<Received>(QUEUE);
    let scheduler_stats = stats.clone();
    if let Err(e) = std::thread::Builder::new()
        .name("relay-scheduler".into())
        .spawn(move || schedule(cfg, rx, &scheduler_stats))
    {
        eprintln!("relay: cannot start the scheduler thread: {e}");
        return;
    }
    let upstream_ip = if cfg.upstream.ip().is_loopback() {
        cfg.upstream.ip()
    } else {
        std::net::IpAddr::from([0, 0, 0, 0])
    };
    // Client -> upstream: one upstream socket per client address; each flow's replies are read
    // by a task of its own. Dropping this future drops the tasks, their senders with them, and
    // the scheduler thread sees the channel close.
    let mut flows: HashMap<SocketAddr, (u64, Arc<std::net::UdpSocket>)> = HashMap::new();
    let mut replies = JoinSet::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, from)) = listen.recv_from(&mut buf).await else {
            continue;
        };
        let at = Instant::now();
        let id = flows.len() as u64 * 2;
        let (id, up) = match flows.get(&from) {
            Some(f) => f.clone(),
            None => {
                let Ok((sock, sock_out)) =
                    std::net::UdpSocket::bind(SocketAddr::new(upstream_ip, 0))
                        .and_then(socket_pair)
                else {
                    continue;
                };
                // Upstream -> client for this flow.
                let (listen_out, tx, stats) = (listen_out.clone(), tx.clone(), stats.clone());
                replies.spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    loop {
                        let Ok((n, _)) = sock.recv_from(&mut buf).await else {
                            continue;
                        };
                        let item = (
                            Instant::now(),
                            id + 1,
                            listen_out.clone(),
                            from,
                            buf[..n].to_vec(),
                        );
                        enqueue(&tx, item, &stats);
                    }
                });
                flows.insert(from, (id, sock_out.clone()));
                (id, sock_out)
            }
        };
        enqueue(&tx, (at, id, up, cfg.upstream, buf[..n].to_vec()), &stats);
    }
}

/// The scheduler thread: admits datagrams (loss, delay, jitter, per-flow order) and sends each
/// when due. Ends when every receive task is gone.
fn schedule(cfg: RelayConfig, rx: mpsc::Receiver<Received>, stats: &RelayStats) {
    let mut heap: BinaryHeap<Reverse<Item>> = BinaryHeap::new();
    let mut last_due: HashMap<u64, Instant> = HashMap::new();
    let mut order = 0u64;
    let mut rng = rand::rngs::StdRng::from_entropy();
    loop {
        let now = Instant::now();
        while heap.peek().is_some_and(|Reverse(i)| i.due <= now) {
            let Reverse(item) = heap.pop().expect("peeked");
            match send(&item) {
                Ok(()) => stats.forwarded.fetch_add(1, Ordering::Relaxed),
                // The socket buffer stayed full: a full queue, as in a router.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    stats.dropped_queue.fetch_add(1, Ordering::Relaxed)
                }
                // Refused by the destination (an ICMP error): lost on the path.
                Err(_) => 0,
            };
        }
        let got = match heap.peek() {
            Some(Reverse(next)) => match rx.recv_timeout(next.due.saturating_duration_since(now)) {
                Ok(got) => got,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            },
            None => match rx.recv() {
                Ok(got) => got,
                Err(_) => return,
            },
        };
        let (at, flow, out, to, data) = got;
        if cfg.loss > 0.0 && rng.gen::<f64>() < cfg.loss {
            stats.dropped_loss.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let jitter = if cfg.jitter.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(rng.gen_range(0.0..=2.0 * cfg.jitter.as_secs_f64()))
        };
        let mut due = (at + cfg.delay + jitter)
            .checked_sub(cfg.jitter)
            .unwrap_or(at);
        // Keep the flow's order.
        if let Some(prev) = last_due.get(&flow) {
            due = due.max(*prev);
        }
        last_due.insert(flow, due);
        order += 1;
        heap.push(Reverse(Item {
            due,
            order,
            out,
            to,
            data,
        }));
    }
}

/// Sends one datagram from the scheduler thread; when the socket buffer is full, waits up to
/// [`SEND_WAIT_MS`] for room once.
fn send(item: &Item) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    match item.out.send_to(&item.data, item.to) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            let mut pfd = libc::pollfd {
                fd: item.out.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the call's duration.
            unsafe { libc::poll(&mut pfd, 1, SEND_WAIT_MS) };
            item.out.send_to(&item.data, item.to).map(drop)
        }
        r => r.map(drop),
    }
}

use rand::SeedableRng;

/// Parses "1%", "0.5%" or "0.01".
pub fn parse_loss(s: &str) -> Result<f64, String> {
    let v = match s.trim().strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|p| p / 100.0),
        None => s.trim().parse::<f64>(),
    }
    .map_err(|_| format!("{s:?} is not a loss like 1% or 0.01"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("{s:?} is not between 0% and 100%"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn delays_both_ways_and_keeps_order() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let cfg = RelayConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            upstream: server.local_addr().unwrap(),
            delay: Duration::from_millis(30),
            jitter: Duration::from_millis(5),
            loss: 0.0,
        };
        let stats = Arc::new(RelayStats::default());
        let (addr, fut) = start(cfg, stats.clone()).await.unwrap();
        let relay = tokio::spawn(fut);
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let t0 = std::time::Instant::now();
        for i in 0..20u8 {
            client.send_to(&[i], addr).await.unwrap();
        }
        let mut buf = [0u8; 16];
        let mut from = None;
        for i in 0..20u8 {
            let (n, f) = server.recv_from(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], &[i], "order kept");
            from = Some(f);
        }
        let one_way = t0.elapsed();
        assert!(one_way >= Duration::from_millis(25), "{one_way:?}");
        server.send_to(b"back", from.unwrap()).await.unwrap();
        let (n, _) = client.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"back");
        assert!(t0.elapsed() >= Duration::from_millis(50));
        assert_eq!(stats.forwarded.load(Ordering::Relaxed), 21);
        relay.abort();
    }

    #[test]
    fn loss_parsing() {
        assert_eq!(parse_loss("1%").unwrap(), 0.01);
        assert_eq!(parse_loss("0.05").unwrap(), 0.05);
        assert!(parse_loss("150%").is_err());
        assert!(parse_loss("lots").is_err());
    }
}
