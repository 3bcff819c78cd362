#!/usr/bin/env python3
"""Measurement side of bench/multiregion/town-hall.sh: a sampler and the report.

  town_hall.py monitor OUT PROCS EDGES   sample until OUT/stop exists
  town_hall.py report OUT                read the samples and the load testers' JSON, print the
                                         tables, write OUT/summary.json; exit 1 if a goal failed

monitor, once a second, appends one JSON line to OUT/samples.jsonl:
- CPU time (utime + stime, seconds) and RSS (MB) of every process listed in PROCS ("pid name"
  lines: the cluster's kcs/etcd/relay processes and the load testers; the file is re-read, so
  processes added later are sampled too), from /proc;
- every edge's `kcs_participants` gauge (EDGES: "name url" lines), from its /metrics;
- the byte counters of the `kcsbench` nftables tables (`town-hall.sh` sets them up): per edge,
  media out (UDP from its media port) and signaling out (TCP from its HTTP port), counted in the
  edge's region namespace; per inter-region link and direction, UDP bytes forwarded by the root
  namespace (the cascade's QUIC; etcd's peer traffic is TCP and not counted).

report computes rates over the *steady window*: the samples in which the edges' participants
add up to at least 99% of their peak (everyone joined, media flowing), so the join storm and the
teardown do not dilute them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
# The edges' participant gauges at >= this share of their summed peak count as "steady".
STEADY_SHARE = 0.99


def read_lines(path: Path) -> list[list[str]]:
    try:
        return [l.split(maxsplit=1) for l in path.read_text().splitlines() if l.strip()]
    except OSError:
        return []


def proc_sample(pid: str) -> dict | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / CLK_TCK
    rss_kb = next((int(l.split()[1]) for l in status.splitlines() if l.startswith("VmRSS:")), 0)
    return {"cpu_s": cpu_s, "rss_mb": rss_kb / 1024}


def participants_gauge(url: str) -> float | None:
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=1) as res:
            text = res.read().decode()
    except OSError:
        return None
    m = re.search(r"^kcs_participants (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def nft_counters(netns: str | None) -> dict[str, int]:
    cmd = ["nft", "-j", "list", "table", "inet", "kcsbench"]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=2).stdout
        items = json.loads(out).get("nftables", [])
    except (OSError, ValueError, subprocess.SubprocessError):
        return {}
    counters = {}
    for item in items:
        rule = item.get("rule")
        if not rule or "comment" not in rule:
            continue
        for e in rule.get("expr", []):
            if "counter" in e:
                counters[rule["comment"]] = e["counter"]["bytes"]
    return counters


def monitor(out: Path, procs: Path, edges: Path) -> None:
    namespaces = [None] + sorted({f"mr-{name.split('-')[1]}" for name, _ in read_lines(edges)})
    with open(out / "samples.jsonl", "a") as f:
        while not (out / "stop").exists():
            t = time.time()
            sample = {"t": t, "procs": {}, "edges": {}, "bytes": {}}
            for pid, name in read_lines(procs):
                s = proc_sample(pid)
                if s:
                    sample["procs"][name] = s
            for name, url in read_lines(edges):
                sample["edges"][name] = participants_gauge(url)
            for ns in namespaces:
                sample["bytes"].update(nft_counters(ns))
            f.write(json.dumps(sample) + "\n")
            f.flush()
            time.sleep(max(0.0, 1.0 - (time.time() - t)))


def rate(first: dict, last: dict, key: str, get) -> float | None:
    a, b = get(first, key), get(last, key)
    dt = last["t"] - first["t"]
    if a is None or b is None or dt <= 0:
        return None
    return (b - a) / dt


def fmt(v, spec=".1f", none="-"):
    return none if v is None else format(v, spec)


def report(out: Path) -> int:
    samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines() if l.strip()]
    testers = [json.loads(p.read_text()) | {"file": p.name}
               for p in sorted(out.glob("tester-*.json"))]
    config = json.loads((out / "config.json").read_text())
    goals: list[tuple[str, bool, str]] = []

    # Joins, from the load testers.
    planned = sum(r["participants_planned"] for r in testers)
    joined = sum(r["participants_joined"] for r in testers)
    join_p99 = max((r["join"]["signaling"]["p99"] for r in testers if r["join"].get("signaling")),
                   default=None)
    first_media_p99 = max((r["join"]["first_media"]["p99"] for r in testers
                           if r["join"].get("first_media")), default=None)
    success = joined / planned if planned else 0.0
    goals.append(("join success >= 99.9%", success >= 0.999,
                  f"{joined} of {planned} ({success * 100:.2f}%)"))
    missing = config["testers"] - len(testers)
    goals.append(("every load tester wrote its report", missing == 0, f"{missing} missing"))

    # Where participants landed: each edge's own gauge at its peak.
    peak = {}
    for s in samples:
        for e, v in s["edges"].items():
            if v is not None:
                peak[e] = max(peak.get(e, 0), v)
    used = sorted(e for e, v in peak.items() if v > 0)
    goals.append((">= 8 edges served participants", len(used) >= 8,
                  f"{len(used)} edges: " + ", ".join(f"{e} {peak[e]:.0f}" for e in sorted(peak))))

    # Steady window.
    totals = [sum(v or 0 for v in s["edges"].values()) for s in samples]
    top = max(totals, default=0)
    steady = [s for s, tot in zip(samples, totals) if top and tot >= STEADY_SHARE * top]
    window = (steady[0], steady[-1]) if len(steady) >= 2 else None
    print(f"steady window: {len(steady)} samples, {top:.0f} participants on the edges at the peak")

    by_bytes = lambda s, k: s["bytes"].get(k)
    by_cpu = lambda s, k: (s["procs"].get(k) or {}).get("cpu_s")
    edge_rows = []
    print("\nper edge (steady window)        participants  media out Mbit/s  signaling out Mbit/s  CPU %  RSS max MB")
    for e in sorted(peak):
        media = rate(*window, f"{e} media", by_bytes) if window else None
        sig = rate(*window, f"{e} signaling", by_bytes) if window else None
        cpu = rate(*window, e, by_cpu) if window else None
        rss = max((s["procs"].get(e, {}).get("rss_mb", 0) for s in samples), default=0)
        row = {"edge": e, "participants": peak[e], "media_mbps": media and media * 8 / 1e6,
               "signaling_mbps": sig and sig * 8 / 1e6, "cpu_pct": cpu and cpu * 100, "rss_mb": rss}
        edge_rows.append(row)
        print(f"  {e:28} {peak[e]:>12.0f}  {fmt(row['media_mbps'], '.2f'):>16}  "
              f"{fmt(row['signaling_mbps'], '.3f'):>20}  {fmt(row['cpu_pct']):>5}  {rss:>10.0f}")

    link_rows = []
    print("\nper inter-region link (steady window, UDP = the cascade)   Mbit/s")
    for key in sorted(k for k in (samples[-1]["bytes"] if samples else {}) if k.startswith("link ")):
        r = rate(*window, key, by_bytes) if window else None
        link_rows.append({"link": key[5:], "mbps": r and r * 8 / 1e6})
        print(f"  {key[5:]:20} {fmt(r and r * 8 / 1e6, '.3f')}")

    node_rows = []
    print("\nper process (steady window CPU %, whole-run max RSS MB)")
    names = sorted({n for s in samples for n in s["procs"]})
    for n in names:
        cpu = rate(*window, n, by_cpu) if window else None
        seen = [s for s in samples if n in s["procs"]]
        whole = rate(seen[0], seen[-1], n, by_cpu) if len(seen) >= 2 else None
        rss = max((s["procs"].get(n, {}).get("rss_mb", 0) for s in samples), default=0)
        node_rows.append({"process": n, "cpu_pct_steady": cpu and cpu * 100,
                          "cpu_pct_run": whole and whole * 100, "rss_max_mb": rss})
        print(f"  {n:28} CPU steady {fmt(cpu and cpu * 100):>6} %  whole run {fmt(whole and whole * 100):>6} %  RSS {rss:>7.0f}")

    # Delay and signaling by region, from the testers.
    region_rows = []
    print("\nregion  testers  planned  joined  receivers  delay p50  p99 (worst tester)  loss     events/session/s  room size seen at end min/max")
    for region in config["regions"]:
        rs = [r for r in testers if r["file"].startswith(f"tester-{region}-")]
        p50 = [r["delay"]["p50"] for r in rs if r.get("delay")]
        p99 = [r["delay"]["p99"] for r in rs if r.get("delay")]
        exp = sum(r["counters"]["expected"] for r in rs)
        lost = sum(r["counters"]["expected"] * r["loss"] for r in rs)
        sig = [r["signaling"] for r in rs if r.get("signaling")]
        sessions = sum(g["sessions"] for g in sig)
        events = sum(g["events"] for g in sig)
        dur = max((r["duration_s"] for r in rs), default=0)
        row = {
            "region": region, "planned": sum(r["participants_planned"] for r in rs),
            "joined": sum(r["participants_joined"] for r in rs),
            "receivers": sum(g["viewers"] for g in config["plan"] if g["region"] == region),
            "delay_p50_ms": max(p50, default=None), "delay_p99_ms": max(p99, default=None),
            "loss": lost / exp if exp else None,
            "events_per_session_per_s": events / sessions / dur if sessions and dur else None,
            # What the sessions' rosters (join page + batched deltas) showed when their tester
            # stopped; testers stop at different times, so this is not a convergence check.
            "roster_min": min((g["roster_min"] for g in sig), default=None),
            "roster_max": max((g["roster_max"] for g in sig), default=None),
        }
        region_rows.append(row)
        print(f"  {region:6} {len(rs):>7}  {row['planned']:>7}  {row['joined']:>6}  {row['receivers']:>9}  "
              f"{fmt(row['delay_p50_ms']):>9}  {fmt(row['delay_p99_ms']):>18}  "
              f"{fmt(row['loss'] and row['loss'] * 100, '.2f')}%  {fmt(row['events_per_session_per_s'], '.2f'):>16}  "
              f"{row['roster_min']}/{row['roster_max']}")
    all_sessions = sum(r["signaling"]["sessions"] for r in testers if r.get("signaling"))
    all_events = sum(r["signaling"]["events"] for r in testers if r.get("signaling"))
    run_s = max((r["duration_s"] for r in testers), default=0)
    per_session = all_events / all_sessions / run_s if all_sessions and run_s else None
    print(f"\nsignaling: {all_events} events to {all_sessions} sessions over {run_s:.0f} s: "
          f"{fmt(per_session, '.2f')} per participant per second")
    print(f"join: signaling p99 (worst tester) {fmt(join_p99)} ms, first media p99 {fmt(first_media_p99)} ms")
    by_file = {r["file"]: r for r in testers}
    no_media = [g["tester"] for g in config["plan"]
                if g["viewers"] and not (by_file.get(g["tester"]) or {}).get("delay")]
    goals.append(("every tester with receivers measured media", not no_media,
                  "without: " + ", ".join(no_media) if no_media else ""))

    print()
    for name, ok, detail in goals:
        print(f"  {'ok  ' if ok else 'FAIL'} {name}: {detail}")
    summary = {"config": config, "planned": planned, "joined": joined, "join_success": success,
               "join_signaling_p99_ms": join_p99, "first_media_p99_ms": first_media_p99,
               "edges": edge_rows, "links": link_rows, "processes": node_rows,
               "regions": region_rows, "events_per_participant_per_s": per_session,
               "steady_samples": len(steady), "goals": [{"goal": g, "ok": ok, "detail": d}
                                                         for g, ok, d in goals]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    ok = all(ok for _, ok, _ in goals)
    print("PASS town-hall" if ok else f"FAIL town-hall: see {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "monitor":
        monitor(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    elif len(sys.argv) == 3 and sys.argv[1] == "report":
        sys.exit(report(Path(sys.argv[2])))
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
