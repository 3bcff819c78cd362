//! The load tester against a real dev edge (the built `kcs` binary on loopback): small
//! scenarios whose figures must be real, and the ways a run can go wrong.
//!
//! Each test starts its own `kcs dev` on OS-chosen ports and stops it at the end (also on
//! failure). The nftables test needs root and skips with a message otherwise.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn loadtest_bin() -> &'static str {
    env!("CARGO_BIN_EXE_loadtest")
}

/// The `kcs` binary next to ours (same target dir and profile), or `$KCS_BIN`.
///
/// `cargo test --workspace` builds it (edge-node's own integration tests need it). Building it
/// from here would run a nested cargo while this one holds the target-dir lock, so a missing
/// binary is a clear failure instead.
fn kcs_bin() -> PathBuf {
    if let Ok(p) = std::env::var("KCS_BIN") {
        return PathBuf::from(p);
    }
    let dir = Path::new(loadtest_bin()).parent().expect("bin dir");
    let kcs = dir.join("kcs");
    assert!(
        kcs.exists(),
        "{} not found: run `cargo build -p edge-node --bin kcs` first (cargo test --workspace does), or set KCS_BIN",
        kcs.display()
    );
    kcs
}

fn free_tcp() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `kcs dev`, killed on drop.
struct Edge {
    child: Child,
    url: String,
    udp: u16,
    _dir: tempfile::TempDir,
}

impl Edge {
    fn start() -> Edge {
        let dir = tempfile::tempdir().unwrap();
        let (http, udp) = (free_tcp(), free_udp());
        let log = std::fs::File::create(dir.path().join("edge.log")).unwrap();
        let child = Command::new(kcs_bin())
            .args([
                "dev",
                "--http",
                &format!("127.0.0.1:{http}"),
                "--udp",
                &format!("127.0.0.1:{udp}"),
                "--advertise",
                "127.0.0.1",
                "--data-dir",
            ])
            .arg(dir.path().join("data"))
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting kcs");
        let mut edge = Edge {
            child,
            url: format!("http://127.0.0.1:{http}"),
            udp,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", http)) {
                use std::io::{Read, Write};
                let _ = s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n");
                let mut out = String::new();
                let _ = s.read_to_string(&mut out);
                if out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200") {
                    return edge;
                }
            }
            if let Ok(Some(st)) = edge.child.try_wait() {
                panic!("kcs exited early ({st}): {}", edge.log());
            }
            assert!(Instant::now() < deadline, "kcs not ready: {}", edge.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("edge.log")).unwrap_or_default()
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs loadtest with `args` (+ --quiet --json), bounded in time; returns the output and the
/// JSON report (when written).
fn loadtest(args: &[&str], limit: Duration) -> (Output, Option<Value>) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let mut child = Command::new(loadtest_bin())
        .args(args)
        .args(["--quiet", "--json"])
        .arg(&json)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "loadtest {args:?} did not end within {limit:?} (a hang):\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let report = std::fs::read_to_string(&json)
        .ok()
        .map(|t| serde_json::from_str(&t).expect("report is JSON"));
    (out, report)
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
fn webinar_over_websocket_reports_real_media_and_server_figures() {
    let edge = Edge::start();
    let dir = tempfile::tempdir().unwrap();
    let html = dir.path().join("r.html");
    let pid = edge.pid().to_string();
    let (out, report) = loadtest(
        &[
            "webinar",
            "--presenters",
            "1",
            "--viewers",
            "3",
            "--duration",
            "4s",
            "--room",
            "ws1",
            "--target",
            &edge.url,
            "--server-pid",
            &pid,
            "--html",
            html.to_str().unwrap(),
        ],
        Duration::from_secs(90),
    );
    let r = report.unwrap_or_else(|| panic!("no report: {}", text(&out)));
    assert!(out.status.success(), "{}\n{}", text(&out), edge.log());
    assert_eq!(r["outcome"], "completed");
    assert_eq!(r["participants_joined"], 4, "{}", text(&out));
    assert_eq!(r["participants_failed"], 0, "{:?}", r["failures"]);
    // 3 viewers x (50 audio + ~60+ video pkt/s) x ~4 s: thousands of packets, every one with
    // a probe that yields a delay sample.
    let rx = f(&r, &["counters", "rx_packets"]);
    assert!(rx > 1000.0, "received {rx} packets: {}", text(&out));
    assert_eq!(
        f(&r, &["delay", "count"]),
        rx,
        "one delay sample per received packet"
    );
    assert!(f(&r, &["delay", "p50"]) > 0.0);
    // The tool's own receive lag is reported beside its send lag: one sample per read, and
    // on this small run far below the delay it no longer adds to.
    let reads = f(&r, &["receive_lag", "count"]);
    assert!(reads > 0.0 && reads <= rx, "{reads} reads for {rx} packets");
    assert!(
        f(&r, &["receive_lag", "p50"]) < 10.0,
        "{}",
        r["receive_lag"]
    );
    // Audio and video both arrive, at a plausible rate (audio ~32 kbit/s while talking).
    let kbps = r["rx_kbps_mean"].as_array().unwrap();
    assert!(kbps[0].as_f64().unwrap() > 10.0, "{kbps:?}");
    let video: f64 = kbps[1..4].iter().map(|v| v.as_f64().unwrap()).sum();
    assert!(video > 100.0, "video kbit/s {video}");
    // Join phases are all measured, and the viewers got media.
    for phase in ["signaling", "ice", "dtls", "first_media"] {
        assert!(
            f(&r, &["join", phase, "count"]) >= 3.0,
            "{phase}: {}",
            r["join"]
        );
    }
    // Receivers sent feedback the edge had to process; the edge's own TWCC feedback reached the publisher.
    assert!(f(&r, &["counters", "twcc_sent"]) > 0.0);
    assert!(f(&r, &["counters", "rr_sent"]) > 0.0);
    assert!(
        f(&r, &["counters", "twcc_received"]) > 0.0,
        "{}",
        r["counters"]
    );
    assert!(
        f(&r, &["server", "rss_max_mb"]) > 1.0,
        "server sampled: {}",
        r["server"]
    );
    assert!(!r["timeline"].as_array().unwrap().is_empty());
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(
        page.contains("<svg") && page.contains("<polyline"),
        "HTML has plots"
    );
    assert!(!page.contains("<script"), "self-contained");
}

/// A small capacity search: each step's figures are the step's own (its measured part), the
/// tool's own lag included, and the result is the largest passing step.
#[test]
fn a_capacity_search_reports_each_step_and_the_tools_lag_in_it() {
    let edge = Edge::start();
    let pid = edge.pid().to_string();
    let (out, report) = loadtest(
        &[
            "capacity",
            "--max-viewers",
            "6",
            "--step",
            "3",
            "--step-duration",
            "3s",
            "--target",
            &edge.url,
            "--server-pid",
            &pid,
        ],
        Duration::from_secs(120),
    );
    let r = report.unwrap_or_else(|| panic!("no report: {}", text(&out)));
    assert!(out.status.success(), "{}\n{}", text(&out), edge.log());
    let steps = r["capacity_steps"].as_array().unwrap();
    let viewers: Vec<u64> = steps
        .iter()
        .map(|s| s["viewers"].as_u64().unwrap())
        .collect();
    assert_eq!(viewers, [3, 6], "{}", text(&out));
    for s in steps {
        assert_eq!(s["pass"], true, "{s}");
        // ~110 packets/s per viewer of one presenter's audio and video.
        let rate = f(s, &["rx_packets_per_s"]) / f(s, &["viewers"]);
        assert!(
            (30.0..400.0).contains(&rate),
            "{rate} packets/s per viewer: {s}"
        );
        assert!(f(s, &["server_cpu_pct"]) > 0.0, "{s}");
        assert!(f(s, &["tool_cpu_pct"]) > 0.0, "{s}");
        // The tool's lag over the step's measured part, and the verdict from it.
        let send = f(s, &["tool_send_lag_p99_ms"]);
        let receive = f(s, &["tool_receive_lag_p99_ms"]);
        assert!(send >= 0.0 && receive >= 0.0, "{s}");
        assert_eq!(
            s["tool_kept_up"].as_bool(),
            Some(send <= 10.0 && receive <= 10.0),
            "{s}"
        );
    }
    assert_eq!(r["capacity_viewers"], 6);
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains("capacity: 6 viewers passed") && summary.contains("the tool "),
        "{summary}"
    );
}

#[test]
fn whip_and_whep_mode_carries_media() {
    let edge = Edge::start();
    let (out, report) = loadtest(
        &[
            "webinar",
            "--presenters",
            "1",
            "--viewers",
            "2",
            "--duration",
            "3s",
            "--mode",
            "whip",
            "--room",
            "wh1",
            "--target",
            &edge.url,
        ],
        Duration::from_secs(90),
    );
    let r = report.unwrap_or_else(|| panic!("no report: {}", text(&out)));
    assert!(out.status.success(), "{}\n{}", text(&out), edge.log());
    assert_eq!(r["participants_joined"], 3, "{}", text(&out));
    assert!(f(&r, &["counters", "rx_packets"]) > 300.0, "{}", text(&out));
}

#[test]
fn a_relay_delay_shows_up_in_the_measured_delay() {
    let edge = Edge::start();
    let mut relay = Command::new(loadtest_bin())
        .args([
            "relay",
            "--upstream",
            &format!("127.0.0.1:{}", edge.udp),
            "--delay",
            "20ms",
            "--jitter",
            "1ms",
            "--for",
            "120s",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(relay.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let relay_addr = first
        .trim()
        .strip_prefix("relay listening on ")
        .expect(&first)
        .to_owned();
    let run = |room: &str, via: Option<&str>| {
        let mut args = vec![
            "webinar",
            "--presenters",
            "1",
            "--viewers",
            "2",
            "--duration",
            "3s",
            "--room",
            room,
            "--target",
            &edge.url,
        ];
        if let Some(v) = via {
            args.extend(["--media-via", v]);
        }
        let (out, report) = loadtest(&args, Duration::from_secs(90));
        let r = report.unwrap_or_else(|| panic!("no report: {}", text(&out)));
        assert!(out.status.success(), "{}", text(&out));
        (f(&r, &["delay", "p50"]), r)
    };
    let (direct, _) = run("d1", None);
    let (relayed, r) = run("d2", Some(&relay_addr));
    let _ = relay.kill();
    let _ = relay.wait();
    // Publisher -> relay -> edge and edge -> relay -> viewer: 20 ms each way.
    let added = relayed - direct;
    assert!(
        added >= 39.0,
        "relay adds 2 x 20 ms, measured {added:.1} ms (direct {direct:.1}, relayed {relayed:.1})"
    );
    assert!(
        added < 140.0,
        "measured {added:.1} ms added: far more than the relay's 40 ms"
    );
    // The edge's own share comes from its kernel arrival stamps: the relay's 20 ms on either
    // side are in the participants' figure and not in the edge's.
    let own = &r["edge_residence"];
    assert!(
        f(&r, &["edge_residence", "packets"]) > 100.0,
        "the edge's histogram saw the media: {own}"
    );
    let own_p50 = f(&r, &["edge_residence", "p50_ms"]);
    assert!(
        own_p50 < 20.0,
        "edge's own p50 <= {own_p50} ms of {relayed:.1} ms end to end: the path is not in it"
    );
}

/// nftables on loopback: drop 5% of what clients send to the edge's UDP port, see ~5% loss at
/// the viewers (no retransmissions, so losses stay lost; the edge keeps the publisher's
/// sequence gaps when it rewrites). A dedicated table, removed afterwards.
///
/// Why the uplink: a 5% drop of what the edge *sends* shows up as only ~2% media loss at the
/// viewers (20% as ~10%), while the tool's count matches the edge's own `rtp_packets_out`
/// exactly without drops; that is an open question about the edge's send path (batched
/// sends), reported with this work rather than hidden in a looser bound.
#[test]
fn an_nftables_random_drop_shows_up_as_loss() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        eprintln!("SKIPPED an_nftables_random_drop_shows_up_as_loss: needs root for nft");
        return;
    }
    if Command::new("nft").arg("--version").output().is_err() {
        eprintln!("SKIPPED an_nftables_random_drop_shows_up_as_loss: nft not installed");
        return;
    }
    let edge = Edge::start();
    let table = format!("loadtest_drop_{}", std::process::id());
    struct Table(String);
    impl Drop for Table {
        fn drop(&mut self) {
            let _ = Command::new("nft")
                .args(["delete", "table", "inet", &self.0])
                .status();
        }
    }
    let nft = |cmd: &str| {
        let o = Command::new("nft")
            .args(cmd.split_whitespace())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "nft {cmd}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    nft(&format!("add table inet {table}"));
    let _guard = Table(table.clone());
    nft(&format!(
        "add chain inet {table} out {{ type filter hook output priority 0 ; }}"
    ));
    nft(&format!(
        "add rule inet {table} out ip daddr 127.0.0.1 udp dport {} numgen random mod 100 < 5 drop",
        edge.udp
    ));
    let (out, report) = loadtest(
        &[
            "webinar",
            "--presenters",
            "1",
            "--viewers",
            "3",
            "--duration",
            "8s",
            "--no-nack",
            "--room",
            "n1",
            "--target",
            &edge.url,
        ],
        Duration::from_secs(120),
    );
    let r = report.unwrap_or_else(|| panic!("no report: {}", text(&out)));
    assert!(out.status.success(), "{}", text(&out));
    let loss = f(&r, &["loss"]);
    let expected = f(&r, &["counters", "expected"]);
    eprintln!(
        "5% drop: measured {:.2}% loss over {expected} packets; counters {}",
        loss * 100.0,
        r["counters"]
    );
    // ~2,500 packets: the binomial spread of a 5% drop is about 0.45%, so 2.5-7.5% is over five
    // standard deviations wide and still tells 5% apart from none or double.
    assert!(
        expected > 1500.0,
        "{expected} packets is too few to measure 5%"
    );
    assert!(
        (0.025..=0.075).contains(&loss),
        "5% drop measured as {:.2}% loss",
        loss * 100.0
    );
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

#[test]
fn an_unreachable_target_ends_with_a_clear_message_and_a_report() {
    let port = free_tcp();
    let (out, report) = loadtest(
        &[
            "webinar",
            "--viewers",
            "2",
            "--target",
            &format!("http://127.0.0.1:{port}"),
        ],
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach") && err.contains(&port.to_string()),
        "{err}"
    );
    let r = report.expect("partial report written");
    assert_eq!(r["outcome"], "aborted");
    assert!(r["error"].as_str().unwrap().contains("cannot reach"));
}

#[test]
fn a_refused_token_ends_with_the_servers_reason() {
    let edge = Edge::start();
    let (out, report) = loadtest(
        &[
            "webinar",
            "--viewers",
            "2",
            "--token",
            "not-a-token",
            "--target",
            &edge.url,
        ],
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refused") && err.contains("token_malformed"),
        "{err}"
    );
    assert_eq!(report.expect("report")["outcome"], "aborted");
}

#[test]
fn a_server_stopping_mid_run_ends_the_run_with_a_partial_report() {
    let mut edge = Edge::start();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let mut child = Command::new(loadtest_bin())
        .args([
            "webinar",
            "--presenters",
            "1",
            "--viewers",
            "2",
            "--duration",
            "60s",
            "--quiet",
            "--room",
            "s1",
            "--target",
            &edge.url,
            "--json",
        ])
        .arg(&json)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(5));
    edge.child.kill().unwrap();
    let _ = edge.child.wait();
    let deadline = Instant::now() + Duration::from_secs(40);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("loadtest hung after the server stopped");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("run aborted"), "{err}");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["outcome"], "aborted");
    assert!(
        f(&r, &["counters", "rx_packets"]) > 0.0,
        "media flowed before the stop"
    );
    assert!(r["timeline"].as_array().unwrap().len() >= 4);
}

#[test]
fn a_scenario_file_error_names_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "name = \"x\"\n[[group]]\ncount = 2\nsubscribe = true\nmax_layer = 9\n",
    )
    .unwrap();
    let out = Command::new(loadtest_bin())
        .arg("run")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 5") && err.contains("group[0].max_layer"),
        "{err}"
    );
}

#[test]
fn town_hall_audience_holds_sessions_and_every_roster_converges() {
    let edge = Edge::start();
    let pid = edge.pid().to_string();
    let (out, report) = loadtest(
        &[
            "town-hall",
            "--presenters",
            "1",
            "--viewers",
            "2",
            "--audience",
            "120",
            "--join-rate",
            "100",
            "--duration",
            "3s",
            "--room",
            "hall",
            "--target",
            &edge.url,
            "--server-pid",
            &pid,
        ],
        Duration::from_secs(90),
    );
    let r = report.unwrap_or_else(|| panic!("no report: {}", text(&out)));
    assert!(out.status.success(), "{}\n{}", text(&out), edge.log());
    assert_eq!(r["participants_joined"], 123, "{}", text(&out));
    let s = &r["signaling"];
    assert_eq!(s["sessions"], 123, "{s}");
    assert_eq!(s["signaling_only"], 120, "{s}");
    // More than 100 joined, so late joiners got only the first roster page in their ack and
    // learned the rest from batched deltas: every session still ends up with the whole room.
    assert_eq!(s["roster_min"], 123, "{s}");
    assert_eq!(s["roster_max"], 123, "{s}");
    // Joins batch: far fewer presence events than one per join per session.
    let per_session = f(s, &["events"]) / 123.0;
    assert!(
        per_session > 1.0 && per_session < 60.0,
        "{per_session} events per session: {s}"
    );
    // The viewers received the presenter's media; the audience none.
    assert!(f(&r, &["counters", "rx_packets"]) > 100.0);
}
