//! Test harness: a real 3-member etcd cluster (Debian's etcd-server) on loopback.
//!
//! Each [`EtcdCluster`] gets its own temporary directory (in /dev/shm when it exists, so fsync
//! is cheap) and six loopback ports chosen free by the OS at start-up. `start` waits until every
//! member reports healthy over its client port; `Drop` kills every member and removes the data,
//! so a failing test leaves nothing running. Install the binaries with control-plane/deps.sh.

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

fn free_port() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port")
}

impl EtcdCluster {
    /// Starts `n` members and waits for all of them to be healthy.
    pub fn start(n: usize) -> Self {
        assert!(
            Command::new("etcd").arg("--version").output().is_ok(),
            "etcd not installed: run control-plane/deps.sh"
        );
        let base = if Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        };
        let dir = tempfile::Builder::new()
            .prefix("kcs-etcd-")
            .tempdir_in(base)
            .expect("temp dir");
        // Hold all listeners until the URLs are fixed so two members never get the same port;
        // release them just before etcd binds (a tiny race with other processes, acceptable).
        let listeners: Vec<(TcpListener, TcpListener)> =
            (0..n).map(|_| (free_port(), free_port())).collect();
        let mut members: Vec<Member> = listeners
            .iter()
            .enumerate()
            .map(|(i, (c, p))| Member {
                name: format!("m{i}"),
                client_url: format!("http://127.0.0.1:{}", c.local_addr().unwrap().port()),
                peer_url: format!("http://127.0.0.1:{}", p.local_addr().unwrap().port()),
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
        drop(listeners);
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
        cluster.wait_healthy(START_TIMEOUT);
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

    /// Waits until every running member reports healthy (it sees a leader).
    pub fn wait_healthy(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            loop {
                if health(&m.client_url) {
                    break;
                }
                if Instant::now() > deadline {
                    panic!(
                        "etcd member {} not healthy after {timeout:?}; log:\n{}",
                        m.name,
                        self.log(&m.name)
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
