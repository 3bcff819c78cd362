//! The load tester against a real Janus (Debian's `janus` package, VideoRoom plugin over its
//! WebSocket API): a small webinar whose figures must be real, and the ways a run against
//! Janus can go wrong (a refused request, nothing listening).
//!
//! Each test starts its own Janus from the installed package with a minimal config
//! (bench/loadtest/janus-config.sh) inside its own network namespace (janus-netns.sh: libnice
//! never gathers loopback interfaces, so Janus's candidate is 127.0.0.2 on a veth that stays in
//! the namespace), runs the load tester in the same namespace, and kills Janus and removes the
//! namespace on drop. Needs root and `janus` (scripts/install-test-deps.sh installs it): without
//! them these tests fail, they do not skip.

use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const IP: &str = "127.0.0.2";
const WS_PORT: u16 = 8188;

fn loadtest_bin() -> &'static str {
    env!("CARGO_BIN_EXE_loadtest")
}

fn bench_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/loadtest")
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Janus in its own network namespace, killed (and the namespace removed) on drop.
struct Janus {
    child: Child,
    ns: String,
    dir: tempfile::TempDir,
}

impl Janus {
    fn start(api_secret: Option<&str>) -> Janus {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the Janus tests need root (a network namespace for Janus's ICE; see the module docs)"
        );
        assert!(
            Command::new("janus").arg("--version").output().is_ok(),
            "janus is not installed: run scripts/install-test-deps.sh (apt-get install janus)"
        );
        static N: AtomicU32 = AtomicU32::new(0);
        let ns = format!(
            "ltj{}x{}",
            std::process::id() % 100_000,
            N.fetch_add(1, Ordering::Relaxed)
        );
        run_ok(
            Command::new("bash")
                .arg(bench_dir().join("janus-netns.sh"))
                .args(["up", &ns]),
        );
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("cfg");
        let mut gen = Command::new("bash");
        gen.arg(bench_dir().join("janus-config.sh"))
            .arg(&cfg)
            .args([IP, &WS_PORT.to_string(), &format!("{ns}-a"), "40000-40999"]);
        if let Some(s) = api_secret {
            gen.arg(s);
        }
        run_ok(&mut gen);
        let log = std::fs::File::create(dir.path().join("janus.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns, "janus", "--configs-folder"])
            .arg(&cfg)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting janus");
        let mut janus = Janus { child, ns, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let probe = Command::new("ip")
                .args(["netns", "exec", &janus.ns, "bash", "-c"])
                .arg(format!(": </dev/tcp/{IP}/{WS_PORT}"))
                .stderr(Stdio::null())
                .status();
            if probe.is_ok_and(|s| s.success()) {
                return janus;
            }
            if let Ok(Some(st)) = janus.child.try_wait() {
                panic!("janus exited early ({st}): {}", janus.log());
            }
            assert!(
                Instant::now() < deadline,
                "janus not ready: {}",
                janus.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn url(&self) -> String {
        format!("janus+ws://{IP}:{WS_PORT}")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("janus.log")).unwrap_or_default()
    }

    /// Runs loadtest in Janus's namespace with `args` (+ --quiet --json), bounded in time.
    fn loadtest(&self, args: &[&str], limit: Duration) -> (Output, Option<Value>) {
        let json = self.dir.path().join("report.json");
        let _ = std::fs::remove_file(&json);
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns, loadtest_bin()])
            .args(args)
            .args(["--quiet", "--json"])
            .arg(&json)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_bounded(&mut child, args, limit);
        let out = child.wait_with_output().unwrap();
        let report = std::fs::read_to_string(&json)
            .ok()
            .map(|t| serde_json::from_str(&t).expect("report is JSON"));
        (out, report)
    }
}

impl Drop for Janus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("bash")
            .arg(bench_dir().join("janus-netns.sh"))
            .args(["down", &self.ns])
            .status();
    }
}

fn wait_bounded(child: &mut Child, args: &[&str], limit: Duration) {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("loadtest {args:?} did not end within {limit:?} (a hang)");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn f(v: &Value, path: &[&str]) -> f64 {
    let mut v = v;
    for p in path {
        v = &v[*p];
    }
    v.as_f64()
        .unwrap_or_else(|| panic!("{path:?} missing in report"))
}

#[test]
fn webinar_against_janus_reports_real_media() {
    let janus = Janus::start(None);
    let pid = janus.child.id().to_string();
    let (out, report) = janus.loadtest(
        &[
            "webinar",
            "--presenters",
            "1",
            "--viewers",
            "3",
            "--duration",
            "5s",
            "--room",
            "janus1",
            "--target",
            &janus.url(),
            "--server-pid",
            &pid,
        ],
        Duration::from_secs(90),
    );
    let r = report.unwrap_or_else(|| panic!("no report: {}\n{}", text(&out), janus.log()));
    assert!(out.status.success(), "{}\n{}", text(&out), janus.log());
    assert_eq!(r["outcome"], "completed");
    assert_eq!(r["participants_joined"], 4, "{}", text(&out));
    assert_eq!(r["participants_failed"], 0, "{:?}", r["failures"]);
    // 3 viewers x (50 audio + video pkt/s) x ~5 s through Janus: thousands of packets, each
    // with a probe, so each a delay sample.
    let rx = f(&r, &["counters", "rx_packets"]);
    assert!(rx > 1000.0, "received {rx} packets: {}", text(&out));
    assert_eq!(f(&r, &["delay", "count"]), rx);
    assert!(f(&r, &["delay", "p50"]) > 0.0);
    assert!(f(&r, &["loss"]) < 0.05, "loss {}", r["loss"]);
    let kbps = r["rx_kbps_mean"].as_array().unwrap();
    assert!(kbps[0].as_f64().unwrap() > 10.0, "audio {kbps:?}");
    let video: f64 = kbps[1..4].iter().map(|v| v.as_f64().unwrap()).sum();
    assert!(
        video > 100.0,
        "video kbit/s {video}: Janus forwarded no simulcast layer?"
    );
    for phase in ["signaling", "ice", "dtls", "first_media"] {
        assert!(
            f(&r, &["join", phase, "count"]) >= 3.0,
            "{phase}: {}",
            r["join"]
        );
    }
    assert!(f(&r, &["counters", "rr_sent"]) > 0.0);
    assert!(
        f(&r, &["server", "rss_max_mb"]) > 1.0,
        "Janus sampled: {}",
        r["server"]
    );
}

#[test]
fn a_request_janus_refuses_ends_with_its_reason() {
    let janus = Janus::start(Some("s3cret"));
    let (out, report) = janus.loadtest(
        &[
            "webinar",
            "--viewers",
            "2",
            "--token",
            "wrong",
            "--target",
            &janus.url(),
        ],
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refused") && err.contains("Unauthorized"),
        "{err}"
    );
    let r = report.expect("partial report written");
    assert_eq!(r["outcome"], "aborted");
}

#[test]
fn an_unreachable_janus_ends_with_a_clear_message() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let args = [
        "webinar",
        "--viewers",
        "2",
        "--quiet",
        "--target",
        &format!("janus+ws://127.0.0.1:{port}"),
        "--json",
        json.to_str().unwrap(),
    ];
    let mut child = Command::new(loadtest_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_bounded(&mut child, &args, Duration::from_secs(30));
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach") && err.contains(&port.to_string()),
        "{err}"
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["outcome"], "aborted");
}
