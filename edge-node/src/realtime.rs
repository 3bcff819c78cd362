//! Real-time scheduling for a node's threads (`realtime_priority`).
//!
//! Why: a datagram relayed over the cascade crosses two threads in an edge (quinn's runtime,
//! then its room's shard), and a client's datagram wakes the shard. On a host where other
//! busy processes share the cores, each wake-up can wait behind them for a time slice: in the
//! multi-region bench (nine nodes, three etcd members, delay relays and the load testers on
//! two cores) that waiting was most of an edge's own delay at 60 viewers per region
//! (BENCHMARKS.md). Under `SCHED_RR` the node's threads preempt ordinary processes as soon as
//! they are woken. Media servers have long offered the same switch (Asterisk's `-p`,
//! FreeSWITCH's `-rp`).
//!
//! The trade-off is the operator's, so it is off by default: the node then runs ahead of
//! everything ordinary on its cores, including under a flood of work. The kernel still keeps a
//! share of each second for ordinary processes (`kernel.sched_rt_runtime_us`, 95% by default),
//! so a saturated node cannot lock a core up.
//!
//! Applied once at start-up, on the main thread before any runtime or shard thread exists:
//! threads inherit their creator's policy, so every thread of the node gets it. Needs
//! `CAP_SYS_NICE` (root, `AmbientCapabilities=CAP_SYS_NICE` in a systemd unit, or
//! `LimitRTPRIO`); without it the node says so and runs with the normal scheduler.

use std::io;

/// Puts the calling thread (and so every thread it starts afterwards) under `SCHED_RR` at
/// `priority` (1-99). 0 leaves the scheduler alone.
pub fn apply(priority: u8) -> io::Result<()> {
    if priority == 0 {
        return Ok(());
    }
    let param = libc::sched_param {
        sched_priority: i32::from(priority),
    };
    // SAFETY: `param` is a valid `sched_param` for the call's duration; pid 0 is this thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_RR, &param) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
