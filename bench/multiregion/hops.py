#!/usr/bin/env python3
"""Each node's own share of the delay over a measured window, from its /metrics.

    python3 bench/multiregion/hops.py [--expect-cascade] BEFORE_DIR AFTER_DIR

Each directory holds one scrape per node (NODE.prom, written by `mr_scrape` in lib.sh) taken
at the start and at the end of the measured part. For every node and series the difference of
the cumulative buckets gives the stays within the window, of which the p50 and p99 are printed
as the upper bound of the bucket they fall in (never better than the truth), with the mean
from `_sum`:

  - client: `kcs_media_residence_seconds` (edges; kernel arrival stamp of a publisher's
    datagram to its copies handed to the kernel or to quinn): the publisher's edge's hop;
  - links: `kcs_cascade_residence_seconds{to="links"}` (origins, and edges relaying to child
    edges; quinn's delivery to the copies handed to quinn);
  - subscribers: `kcs_cascade_residence_seconds{to="subscribers"}` (edges; quinn's delivery
    to the SRTP copies handed to the kernel);
  - shard wait: `kcs_cascade_shard_wait_seconds` (edges; quinn's delivery to the room's
    shard taking the datagram from its inbox): the part of the links and subscribers stays
    spent waiting for the shard's thread, not working.

Then one line, "per cascade hop p99 <= X ms", X the largest p99 of the cascade series (links,
subscribers; not the shard wait, which is inside them) over all nodes. What each span includes and excludes: docs/cascade.md
("Residence"). Prints figures only; never fails on speed. Exit 1 when a scrape is missing
or unreadable, or, with --expect-cascade, when no node timed cascade datagrams to links or none
to subscribers in the window (the media did not cross the cascade, or the histograms are not
fed).
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

SERIES = {
    "client": ("kcs_media_residence_seconds", ""),
    "links": ("kcs_cascade_residence_seconds", 'to="links"'),
    "subscribers": ("kcs_cascade_residence_seconds", 'to="subscribers"'),
    "shard wait": ("kcs_cascade_shard_wait_seconds", ""),
}
LINE = re.compile(r'^(\w+)\{([^}]*)\} (\S+)$|^(\w+) (\S+)$')


def parse(text: str) -> dict[str, tuple[list[tuple[float, float]], float]]:
    """Series name -> (cumulative buckets [(le seconds, count)], sum seconds)."""
    buckets: dict[str, list[tuple[float, float]]] = {}
    sums: dict[str, float] = {}
    for line in text.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        name, labels, value = (m.group(1), m.group(2), m.group(3)) if m.group(1) else (
            m.group(4), "", m.group(5))
        pairs = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        for key, (metric, want) in SERIES.items():
            want_pairs = dict(re.findall(r'(\w+)="([^"]*)"', want))
            if name == metric + "_bucket" and "le" in pairs:
                rest = {k: v for k, v in pairs.items() if k != "le"}
                if rest == want_pairs:
                    le = math.inf if pairs["le"] == "+Inf" else float(pairs["le"])
                    buckets.setdefault(key, []).append((le, float(value)))
            elif name == metric + "_sum" and pairs == want_pairs:
                sums[key] = float(value)
    return {k: (sorted(b), sums.get(k, 0.0)) for k, b in buckets.items()}


def window(before, after):
    """(packets, p50 ms, p99 ms, mean ms) of what happened between two scrapes, or None."""
    (b0, s0), (b1, s1) = before, after
    if [le for le, _ in b0] != [le for le, _ in b1]:
        return None
    delta = [(le, n1 - n0) for (le, n0), (_, n1) in zip(b0, b1)]
    packets = delta[-1][1] if delta else 0
    if packets <= 0:
        return (0, None, None, None)

    def quantile(q: float):
        rank = math.ceil(q * packets)
        for le, n in delta:
            if n >= rank:
                return le * 1000 if math.isfinite(le) else None
        return None

    return (int(packets), quantile(0.5), quantile(0.99), (s1 - s0) / packets * 1000)


def main() -> int:
    args = sys.argv[1:]
    expect = "--expect-cascade" in args
    args = [a for a in args if a != "--expect-cascade"]
    before_dir, after_dir = Path(args[0]), Path(args[1])
    seen = {"links": 0, "subscribers": 0}
    fmt = lambda v: ">100" if v is None else f"{v:.2f}"
    print("node           series       packets  p50 ms  p99 ms  mean ms")
    worst = None
    ok = True
    for after_file in sorted(after_dir.glob("*.prom")):
        node = after_file.stem
        before_file = before_dir / after_file.name
        try:
            after = parse(after_file.read_text())
            before = parse(before_file.read_text())
        except OSError as e:
            print(f"{node:14} no scrape: {e}")
            ok = False
            continue
        for key in SERIES:
            if key not in after or key not in before:
                continue
            w = window(before[key], after[key])
            if w is None:
                print(f"{node:14} {key:11}  restarted or changed buckets")
                continue
            packets, p50, p99, mean = w
            if packets == 0:
                continue
            print(f"{node:14} {key:11}  {packets:>7}  {fmt(p50):>6}  {fmt(p99):>6}  {mean:7.2f}")
            if key in seen:
                seen[key] += packets
            if key in seen:
                p = math.inf if p99 is None else p99
                if worst is None or p > worst[0]:
                    worst = (p, node, key, packets)
    if worst is None:
        print("per cascade hop p99: no cascade datagrams in the window")
    else:
        p, node, key, packets = worst
        shown = ">100" if math.isinf(p) else f"{p:g}"
        print(f"per cascade hop p99 <= {shown} ms (largest: {node} {key}, {packets} packets; "
              "bucket upper bounds, quinn's own receive and send not included)")
    if expect and not all(seen.values()):
        print(f"FAIL hops: cascade datagrams timed in the window: {seen}")
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
