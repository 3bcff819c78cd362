//! Test harness: a real 3-member etcd cluster (Debian's etcd-server) on loopback.
//!
//! Each [`EtcdCluster`] gets its own temporary directory (in /dev/shm when it exists, so fsync
//! is cheap) and two loopback ports per member. `start` waits until every member reports healthy
//! over its client port and is still running; `Drop` kills every member and removes the data,
//! so a failing test leaves nothing running. Install the binaries with control-plane/deps.sh.
//!
//! Ports come from below the kernel's ephemeral range (32768 and up), handed out by one
//! process-wide counter that starts at an offset from the pid. A port the OS picked (`bind` to
//! port 0) is free only until it is released, and tests in one binary start clusters at the same
//! time: one CI run had two clusters' members on one port, so two tests shared a store. Here no
//! two clusters of a process get the same port, no outgoing connection or `bind(0)` takes one,
//! and a member that still failed to bind (another process holds the port) exits, which `start`
//! notices and answers with fresh ports.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a fresh cluster may take to elect a leader and report healthy. A cold start on
/// this machine takes about a second; two busy shared cores can make it several.
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Member {
    pub name: String,
    pub client_url: String,
    pub peer_url: String,
    child: Option<Child>,
    args: Vec<std::ffi::OsString>,
}

pub struct EtcdCluster {
    pub members: Vec<Member>,
    dir: tempfile::TempDir,
}

/// Ports handed out start here and stay below the ephemeral range.
const PORTS: std::ops::Range<u16> = 10_000..32_000;

/// A loopback port in [`PORTS`] that no earlier call in this process returned and that is free
/// for both TCP and UDP now. Child processes (etcd members, `kcs` nodes) bind it soon after.
pub fn unused_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = u32::from(PORTS.end - PORTS.start);
    // Separate test binaries (pids) start far apart in the range.
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(397) % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let port = PORTS.start + offset as u16;
        let free = TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok();
        if free {
            return port;
        }
    }
    panic!("no free loopback port in {PORTS:?}");
}

impl EtcdCluster {
    /// Starts `n` members and waits for all of them to be healthy.
    pub fn start(n: usize) -> Self {
        assert!(
            Command::new("etcd").arg("--version").output().is_ok(),
            "etcd not installed: run control-plane/deps.sh"
        );
        for _ in 0..3 {
            let mut cluster = Self::spawn_all(n);
            cluster.wait_healthy(START_TIMEOUT);
            match cluster.exited() {
                None => return cluster,
                // Most likely a port taken between our check and its bind: try fresh ports.
                Some(name) => eprintln!(
                    "etcd member {name} exited at start; log:\n{}",
                    cluster.log(&name)
                ),
            }
        }
        panic!("etcd cluster did not start in three attempts (see the logs above)");
    }

    /// The name of a member that was started and is no longer running, if any.
    fn exited(&mut self) -> Option<String> {
        self.members.iter_mut().find_map(|m| {
            let gone = matches!(m.child.as_mut().map(|c| c.try_wait()), Some(Ok(Some(_))));
            gone.then(|| m.name.clone())
        })
    }

    fn spawn_all(n: usize) -> Self {
        let base = if Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        };
        let dir = tempfile::Builder::new()
            .prefix("kcs-etcd-")
            .tempdir_in(base)
            .expect("temp dir");
        let mut members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_url: format!("http://127.0.0.1:{}", unused_port()),
                peer_url: format!("http://127.0.0.1:{}", unused_port()),
                child: None,
                args: Vec::new(),
            })
            .collect();
        let initial: Vec<String> = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect();
        let initial = initial.join(",");
        let token = dir
            .path()
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "kcs-test".into());
        for m in &mut members {
            let data = dir.path().join(&m.name);
            m.args = [
                "--name",
                &m.name,
                "--data-dir",
                &data.to_string_lossy(),
                "--listen-client-urls",
                &m.client_url,
                "--advertise-client-urls",
                &m.client_url,
                "--listen-peer-urls",
                &m.peer_url,
                "--initial-advertise-peer-urls",
                &m.peer_url,
                "--initial-cluster",
                &initial,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                &token,
                "--log-level",
                "warn",
            ]
            .iter()
            .map(std::ffi::OsString::from)
            .collect();
        }
        let mut cluster = Self { members, dir };
        for i in 0..cluster.members.len() {
            cluster.spawn(i);
        }
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let m = &mut self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", m.name)))
            .expect("log file");
        let child = Command::new("etcd")
            .args(&m.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn etcd");
        m.child = Some(child);
    }

    /// Starts a killed member again on its old data directory and ports (it rejoins).
    pub fn restart(&mut self, i: usize) {
        if self.members[i].child.is_none() {
            self.spawn(i);
        }
    }

    /// Client URLs of all members (including killed ones, as a deployment's config would).
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// Waits until every running member reports healthy (it sees a leader). A member that
    /// exits meanwhile is left for the caller to notice ([`Self::start`] retries).
    pub fn wait_healthy(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for i in 0..self.members.len() {
            loop {
                let m = &mut self.members[i];
                let Some(child) = m.child.as_mut() else { break };
                if matches!(child.try_wait(), Ok(Some(_))) || health(&m.client_url) {
                    break;
                }
                if Instant::now() > deadline {
                    let name = m.name.clone();
                    panic!(
                        "etcd member {name} not healthy after {timeout:?}; log:\n{}",
                        self.log(&name)
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Kills member `i` (SIGKILL, no goodbye: a crashed host).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// GET /health on a member's client URL: true when it answers `"health":"true"`.
fn health(client_url: &str) -> bool {
    let addr = client_url.trim_start_matches("http://");
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes; returns whether it held.
pub async fn eventually<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
