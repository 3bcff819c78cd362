//! `realtime_priority`: every thread of a real `kcs dev` runs under SCHED_RR at the priority
//! asked for where the machine allows it (root or CAP_SYS_NICE, as CI runs), or the node says
//! why not and keeps the normal scheduler.

mod common;

use common::{free_port, kcs, wait_healthy};
use std::net::SocketAddr;

/// (thread name, scheduling policy, real-time priority) of every thread of `pid`, from
/// /proc/PID/task/TID/stat (fields 40 and 41, counted after the parenthesised name).
fn threads(pid: u32) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(stat) = std::fs::read_to_string(task.unwrap().path().join("stat")) else {
            continue; // the thread ended meanwhile
        };
        let (head, tail) = stat.rsplit_once(')').unwrap();
        let name = head.split_once('(').unwrap().1.to_string();
        let fields: Vec<&str> = tail.split_whitespace().collect();
        // `tail` starts at field 3 (state).
        let field = |n: usize| fields[n - 3].parse::<u32>().unwrap();
        out.push((name, field(41), field(40)));
    }
    out
}

#[tokio::test]
async fn realtime_priority_puts_every_thread_under_round_robin() {
    let dir = tempfile::tempdir().unwrap();
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let args: Vec<String> = [
        "dev",
        "--http",
        &http.to_string(),
        "--udp",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--data-dir",
        &dir.path().join("data").to_string_lossy(),
        "--realtime-priority",
        "7",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let node = kcs(dir.path(), "edge", &args);
    wait_healthy(http).await;
    let threads = threads(node.0.id());
    assert!(
        threads.iter().any(|(name, ..)| name == "kcs-shard-1"),
        "the shard threads are there: {threads:?}"
    );
    // Whether this machine lets us (root, or CAP_SYS_NICE) use SCHED_RR: tried on a thread of
    // our own that ends at once, so nothing else here changes policy.
    let permitted = std::thread::spawn(|| edge_node::realtime::apply(1).is_ok())
        .join()
        .unwrap();
    if permitted {
        const SCHED_RR: u32 = 2;
        for (name, policy, priority) in &threads {
            assert_eq!(
                (*policy, *priority),
                (SCHED_RR, 7),
                "thread {name}: {threads:?}"
            );
        }
    } else {
        let log = std::fs::read_to_string(dir.path().join("edge.log")).unwrap();
        assert!(log.contains("realtime_priority not applied"), "{log}");
        assert!(
            threads.iter().all(|(_, policy, _)| *policy == 0),
            "{threads:?}"
        );
    }
}
