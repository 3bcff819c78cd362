#!/usr/bin/env python3
"""Two edges and an origin, with aiortc: publish on one edge, play on the other.

A real cluster on loopback: `kcs certs` (cluster CA and node certificates), one `kcs origin`,
two `kcs edge --origin quic://origin@...` verifying tokens with the dev key's public half. An
aiortc peer publishes VP8 + Opus over WHIP to edge A (plain, then 3 rid simulcast layers); a
second aiortc peer plays the room over WHEP from edge B. The media crosses the cascade as QUIC
datagrams (edge A -> origin -> edge B): frames are decoded at the size sent (or a layer's
size), audio arrives, and the sessions end cleanly. The origin's relay counters show the
packets went through it, and the hops' residence histograms (`kcs_cascade_residence_seconds`:
the origin's `to="links"`, edge B's `to="subscribers"`) counted them.

Run: python3 tests/interop/test_cascade.py  (prints PASS/FAIL, exits non-zero on failure)
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp  # noqa: E402
from kcs_edge import ARTIFACTS, free_port, kcs_bin  # noqa: E402
from test_whip_whep import (  # noqa: E402  (also patches aioice to loopback)
    HTTP_TIMEOUT,
    SIMULCAST_LAYERS,
    Checks,
    publish_and_play,
)

NAME = "cascade"
ROOM = f"cascade-{os.getpid()}"
SIMULCAST_ROOM = f"cascade-simulcast-{os.getpid()}"
READY_TIMEOUT_S = 15.0


def wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{log.name}: exited early with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1) as res:
                if res.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}/healthz not 200 within {READY_TIMEOUT_S} s")
        time.sleep(0.1)


def series(url: str, key: str) -> float:
    """The value of the one line of `url`'s /metrics that starts with `key ` (0 if none)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=2) as res:
        text = res.read().decode()
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line[len(key) + 1:])
    return 0.0


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=2) as res:
        text = res.read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.eE+-]+)$", line)
        if m:
            total += float(m.group(2))
    return total


class ClusterEdge:
    """What publish_and_play needs of an edge: `url`, `token()`."""

    def __init__(self, cluster: "Cluster", name: str) -> None:
        self.cluster = cluster
        self.name = name
        self.http_port = free_port(socket.SOCK_STREAM)
        self.udp_port = free_port(socket.SOCK_DGRAM)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def token(self, room: str, identity: str, role: str = "host") -> str:
        return self.cluster.token(room, identity, role)


class Cluster:
    def __init__(self) -> None:
        self.bin = kcs_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="kcs-cascade-"))
        self.procs: list[tuple[subprocess.Popen, Path]] = []
        self.origin_http = ""

    def run(self, name: str, args: list[str]) -> subprocess.Popen:
        ARTIFACTS.mkdir(exist_ok=True)
        log = ARTIFACTS / f"{NAME}-{name}.log"
        out = open(log, "wb")
        proc = subprocess.Popen([str(self.bin), *args], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={"RUST_LOG": "info", **os.environ})
        out.close()
        self.procs.append((proc, log))
        return proc

    def tls(self, node: str) -> list[str]:
        certs = self.dir / "certs"
        return ["--ca", str(certs / "ca.pem"), "--cert", str(certs / f"{node}.pem"),
                "--key", str(certs / f"{node}.key")]

    def token(self, room: str, identity: str, role: str = "host") -> str:
        out = subprocess.run(
            [str(self.bin), "token", "--room", room, "--identity", identity, "--role", role,
             "--data-dir", str(self.dir / "dev")],
            check=True, capture_output=True, text=True)
        return out.stdout.strip()

    def start(self) -> tuple[ClusterEdge, ClusterEdge]:
        subprocess.run([str(self.bin), "certs", "--out", str(self.dir / "certs"),
                        "--node", "origin,edge-a,edge-b"], check=True, capture_output=True)
        public_key = subprocess.run(
            [str(self.bin), "token", "--public-key", "--room", "x", "--identity", "x",
             "--data-dir", str(self.dir / "dev")],
            check=True, capture_output=True, text=True).stdout.strip()
        cascade = free_port(socket.SOCK_DGRAM)
        http = free_port(socket.SOCK_STREAM)
        self.origin_http = f"http://127.0.0.1:{http}"
        proc = self.run("origin", ["origin", "--cascade", f"127.0.0.1:{cascade}",
                                   "--http", f"127.0.0.1:{http}", "--node-id", "origin",
                                   *self.tls("origin")])
        wait_healthy(self.origin_http, proc, self.procs[-1][1])
        edges = []
        for node in ("edge-a", "edge-b"):
            e = ClusterEdge(self, node)
            proc = self.run(node, [
                "edge", "--http", f"127.0.0.1:{e.http_port}", "--udp", f"127.0.0.1:{e.udp_port}",
                "--advertise", "127.0.0.1", "--data-dir", str(self.dir / node),
                "--token-public-key", public_key, "--node-id", node,
                "--origin", f"quic://origin@127.0.0.1:{cascade}", *self.tls(node)])
            wait_healthy(e.url, proc, self.procs[-1][1])
            edges.append(e)
        return edges[0], edges[1]

    def tails(self, lines: int = 15) -> str:
        out = []
        for _, log in self.procs:
            try:
                text = log.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                text = []
            out.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc, _ in self.procs:
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


async def run(cluster: Cluster, a: ClusterEdge, b: ClusterEdge, c: Checks) -> None:
    relayed = 'kcs_cascade_residence_seconds_count{to="links"}'
    delivered = 'kcs_cascade_residence_seconds_count{to="subscribers"}'
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        hops_before = (series(cluster.origin_http, relayed), series(b.url, delivered))
        before = metric(cluster.origin_http, "kcs_relay_datagrams_in_total")
        frames = await publish_and_play(c, http, a, ROOM, None, play_edge=b)
        frames += await publish_and_play(c, http, a, SIMULCAST_ROOM, SIMULCAST_LAYERS, play_edge=b)
        after = metric(cluster.origin_http, "kcs_relay_datagrams_in_total")
        # Every frame edge B's player decoded came in at least one RTP packet
        # that crossed the origin's relay.
        c.check("the media went through the origin's relay",
                frames > 0 and after - before >= frames,
                f"{after - before:.0f} datagrams relayed for {frames} frames decoded on edge B")
        # Each hop timed its own share (figures printed, never asserted): the origin from
        # quinn's delivery to its copy handed to quinn, edge B from quinn's delivery to the SRTP
        # copy for its player handed to the kernel. Every frame decoded came in at least one
        # such packet. (Shards fold their tallies in every tick: wait one out.)
        await asyncio.sleep(0.2)
        hops = (series(cluster.origin_http, relayed) - hops_before[0],
                series(b.url, delivered) - hops_before[1])
        sums = (series(cluster.origin_http, relayed.replace("_count", "_sum")),
                series(b.url, delivered.replace("_count", "_sum")))
        print(f"[{NAME}] hop residence: origin {hops[0]:.0f} datagrams, {sums[0]:.3f} s in all; "
              f"edge B to its player {hops[1]:.0f}, {sums[1]:.3f} s", flush=True)
        c.check("each cascade hop timed the media it passed on",
                hops[0] >= frames and hops[1] >= frames and min(sums) > 0,
                f"origin {hops[0]:.0f}, edge B {hops[1]:.0f} timed for {frames} frames")


async def main() -> int:
    c = Checks()
    cluster = Cluster()
    try:
        a, b = cluster.start()
        print(f"[{NAME}] origin {cluster.origin_http}, edge A {a.url}, edge B {b.url}", flush=True)
        await asyncio.wait_for(run(cluster, a, b, c), timeout=150)
    except Exception as err:  # the reason goes in the FAIL line
        c.failed.append(f"{type(err).__name__}: {err}")
    finally:
        if c.failed:
            print(f"[{NAME}] log tails:\n{cluster.tails()}", flush=True)
        cluster.stop()
    if c.failed:
        print(f"FAIL {NAME}: {'; '.join(c.failed)}", flush=True)
        return 1
    print(f"PASS {NAME}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
