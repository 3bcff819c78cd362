#!/usr/bin/env python3
"""An edge dies during a meeting, with aiortc: the rest of the meeting carries on.

A real cluster on loopback (as in test_cascade.py): `kcs certs`, one `kcs origin` with a 3 s
grace period, three `kcs edge --origin` (A, B, C). An aiortc peer publishes VP8 + Opus over WHIP
to edge A; aiortc players watch the room over WHEP from edges B and C. Then edge B is killed
with SIGKILL (no goodbye on its cascade link), and the test checks what participants see:

1. C's player keeps decoding video and audio (its frame counts keep growing), and the
   publisher's connection on A stays up;
2. after the grace period the origin gives edge B up (`kcs_origin_edges_expired_total` 1) and
   drops B's participant from the room (`kcs_origin_participants` falls from 3 to 2);
3. B's participant comes back through edge C (same identity, a new WHEP session) and decodes
   video and audio there;
4. nothing else was disturbed: A and C answer /healthz, the origin still links both, C's first
   player decoded throughout, and no other edge expired.

Run: python3 tests/interop/test_edge_failure.py  (prints PASS/FAIL, exits non-zero on failure)
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urljoin

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp  # noqa: E402
from aiortc import RTCPeerConnection, RTCSessionDescription  # noqa: E402
from aiortc.mediastreams import MediaStreamError  # noqa: E402
from kcs_edge import free_port  # noqa: E402
import test_cascade  # noqa: E402
from test_cascade import Cluster, ClusterEdge, metric, wait_healthy  # noqa: E402
from test_whip_whep import (  # noqa: E402  (also patches aioice to loopback)
    HTTP_TIMEOUT,
    Checks,
    MovingBarTrack,
    ToneTrack,
    delete,
    post_sdp,
    prefer_vp8,
    wait_connected,
)

NAME = "edge_failure"
test_cascade.NAME = NAME  # the cluster's logs: artifacts/edge_failure-<node>.log
ROOM = f"edge-failure-{os.getpid()}"
# Short, so the test is quick; the origin's default is 10 s.
GRACE_S = 3
# Frames that show media flows: 1 s of 30 fps video, 1 s of 20 ms audio frames.
VIDEO_FRAMES = 30
AUDIO_FRAMES = 50
# Bounds on waits (not speed requirements): generous for a loaded 2-core machine.
MEDIA_TIMEOUT_S = 20.0
EXPIRY_TIMEOUT_S = GRACE_S + 15.0


class Player:
    """An aiortc WHEP player that counts the frames it decodes, per kind."""

    def __init__(self, edge: ClusterEdge, identity: str) -> None:
        self.edge = edge
        self.identity = identity
        self.token = edge.token(ROOM, identity, "attendee")
        self.pc = RTCPeerConnection()
        self.counts = {"video": 0, "audio": 0}
        # Longest time between two decoded video frames (reported, not asserted).
        self.max_video_gap_s = 0.0
        self.location = ""
        self._tasks: list[asyncio.Task] = []

    async def start(self, http) -> tuple[int, str]:
        @self.pc.on("track")
        def on_track(track) -> None:
            self._tasks.append(asyncio.ensure_future(self._consume(track)))

        self.pc.addTransceiver("video", direction="recvonly")
        self.pc.addTransceiver("audio", direction="recvonly")
        await self.pc.setLocalDescription(await self.pc.createOffer())
        status, headers, answer = await post_sdp(
            http, f"{self.edge.url}/whep/{ROOM}", self.pc.localDescription.sdp, self.token)
        if status != 201:
            return status, answer
        self.location = urljoin(self.edge.url + "/", headers.get("Location", ""))
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await wait_connected(self.pc, f"player {self.identity} on {self.edge.name}")
        return status, ""

    async def _consume(self, track) -> None:
        last = None
        while True:
            try:
                await track.recv()
            except MediaStreamError:  # the track ended
                return
            self.counts[track.kind] += 1
            if track.kind == "video":
                now = time.monotonic()
                if last is not None:
                    self.max_video_gap_s = max(self.max_video_gap_s, now - last)
                last = now

    async def frames_grow(self, video: int, audio: int) -> dict[str, int]:
        """Waits (bounded) until `video` and `audio` more frames arrived; returns the growth."""
        start = dict(self.counts)
        deadline = time.monotonic() + MEDIA_TIMEOUT_S
        while time.monotonic() < deadline:
            grown = {k: self.counts[k] - start[k] for k in start}
            if grown["video"] >= video and grown["audio"] >= audio:
                break
            await asyncio.sleep(0.1)
        return {k: self.counts[k] - start[k] for k in start}

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await self.pc.close()


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as res:
            return res.status == 200
    except OSError:
        return False


async def wait_metric(url: str, name: str, want: float, timeout: float) -> float:
    """Polls the metric until it equals `want` or the time is up; returns the last value."""
    deadline = time.monotonic() + timeout
    value = metric(url, name)
    while value != want and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        value = metric(url, name)
    return value


class FailoverCluster(Cluster):
    """Cluster with three edges and a short grace period on the origin."""

    def start3(self) -> tuple[ClusterEdge, ClusterEdge, ClusterEdge]:
        names = ("edge-a", "edge-b", "edge-c")
        subprocess.run([str(self.bin), "certs", "--out", str(self.dir / "certs"),
                        "--node", ",".join(("origin", *names))], check=True, capture_output=True)
        public_key = subprocess.run(
            [str(self.bin), "token", "--public-key", "--room", "x", "--identity", "x",
             "--data-dir", str(self.dir / "dev")],
            check=True, capture_output=True, text=True).stdout.strip()
        cascade = free_port(socket.SOCK_DGRAM)
        http = free_port(socket.SOCK_STREAM)
        self.origin_http = f"http://127.0.0.1:{http}"
        proc = self.run("origin", ["origin", "--cascade", f"127.0.0.1:{cascade}",
                                   "--http", f"127.0.0.1:{http}", "--node-id", "origin",
                                   "--grace-secs", str(GRACE_S), *self.tls("origin")])
        wait_healthy(self.origin_http, proc, self.procs[-1][1])
        edges = []
        for node in names:
            e = ClusterEdge(self, node)
            proc = self.run(node, [
                "edge", "--http", f"127.0.0.1:{e.http_port}", "--udp", f"127.0.0.1:{e.udp_port}",
                "--advertise", "127.0.0.1", "--data-dir", str(self.dir / node),
                "--token-public-key", public_key, "--node-id", node,
                "--origin", f"quic://origin@127.0.0.1:{cascade}", *self.tls(node)])
            wait_healthy(e.url, proc, self.procs[-1][1])
            e.proc = proc
            edges.append(e)
        return edges[0], edges[1], edges[2]


async def run(cluster: FailoverCluster, a: ClusterEdge, b: ClusterEdge, e_c: ClusterEdge,
              c: Checks) -> None:
    origin = cluster.origin_http
    pub = RTCPeerConnection()
    players: list[Player] = []
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        try:
            # The meeting: a WHIP publisher on A, WHEP players on B and C.
            prefer_vp8(pub.addTransceiver(MovingBarTrack(), direction="sendonly"))
            pub.addTransceiver(ToneTrack(), direction="sendonly")
            await pub.setLocalDescription(await pub.createOffer())
            pub_token = a.token(ROOM, "presenter")
            status, headers, answer = await post_sdp(
                http, f"{a.url}/whip/{ROOM}", pub.localDescription.sdp, pub_token)
            if not c.check("WHIP publish on edge A -> 201", status == 201, f"{status} {answer[:160]!r}"):
                return
            await pub.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
            await wait_connected(pub, "WHIP publisher")

            on_b, on_c = Player(b, "viewer-b"), Player(e_c, "viewer-c")
            players += [on_b, on_c]
            for p in (on_b, on_c):
                status, body = await p.start(http)
                if not c.check(f"WHEP play on {p.edge.name} -> 201", status == 201, f"{status} {body[:160]!r}"):
                    return
            for p in (on_b, on_c):
                grown = await p.frames_grow(VIDEO_FRAMES, AUDIO_FRAMES)
                c.check(f"the player on {p.edge.name} decodes video and audio through the cascade",
                        grown["video"] >= VIDEO_FRAMES and grown["audio"] >= AUDIO_FRAMES, str(grown))
            before = metric(origin, "kcs_origin_participants")
            c.check("the origin's room holds the presenter and both players", before == 3,
                    f"kcs_origin_participants {before:.0f}")

            # Edge B dies: no goodbye, no closed link, just gone.
            b.proc.kill()
            b.proc.wait()
            killed_at = time.monotonic()
            print(f"[{NAME}] edge B killed (SIGKILL)", flush=True)

            grown = await on_c.frames_grow(VIDEO_FRAMES, AUDIO_FRAMES)
            c.check("C's player keeps decoding after B died",
                    grown["video"] >= VIDEO_FRAMES and grown["audio"] >= AUDIO_FRAMES, str(grown))
            c.check("the publisher on A stays connected", pub.connectionState == "connected",
                    pub.connectionState)

            expired = await wait_metric(origin, "kcs_origin_edges_expired_total", 1, EXPIRY_TIMEOUT_S)
            left = await wait_metric(origin, "kcs_origin_participants", 2, 5)
            waited = time.monotonic() - killed_at
            c.check("after the grace period the origin gives edge B up", expired == 1,
                    f"edges_expired_total {expired:.0f} after {waited:.1f} s (grace {GRACE_S} s)")
            c.check("B's participant left the room; the others stayed", left == 2,
                    f"kcs_origin_participants {left:.0f}")
            c.check("B was not dropped before its grace period", waited >= GRACE_S,
                    f"{waited:.1f} s")

            # B's participant comes back through C.
            back = Player(e_c, "viewer-b")
            players.append(back)
            status, body = await back.start(http)
            if c.check("B's participant plays again on edge C -> 201", status == 201, f"{status} {body[:160]!r}"):
                grown = await back.frames_grow(VIDEO_FRAMES, AUDIO_FRAMES)
                c.check("and decodes video and audio there",
                        grown["video"] >= VIDEO_FRAMES and grown["audio"] >= AUDIO_FRAMES, str(grown))
                now = await wait_metric(origin, "kcs_origin_participants", 3, 5)
                c.check("the room counts B's participant again", now == 3,
                        f"kcs_origin_participants {now:.0f}")

            # Nothing else disturbed.
            grown = await on_c.frames_grow(VIDEO_FRAMES, AUDIO_FRAMES)
            c.check("C's first player still decoding at the end",
                    grown["video"] >= VIDEO_FRAMES and grown["audio"] >= AUDIO_FRAMES,
                    f"{grown}; longest gap between its video frames over the whole run "
                    f"{on_c.max_video_gap_s * 1000:.0f} ms")
            c.check("edges A and C healthy", healthy(a.url) and healthy(e_c.url))
            links = metric(origin, "kcs_origin_links")
            expired = metric(origin, "kcs_origin_edges_expired_total")
            c.check("the origin still links A and C, and only B expired", links == 2 and expired == 1,
                    f"links {links:.0f}, expired {expired:.0f}")
            for p in (on_c, back):
                if p.location:
                    status, _ = await delete(http, p.location, p.token)
                    c.check(f"DELETE of {p.identity}'s WHEP session on C -> 2xx", 200 <= status < 300, str(status))
        finally:
            for p in players:
                await p.close()
            await pub.close()


async def main() -> int:
    c = Checks()
    cluster = FailoverCluster()
    try:
        a, b, e_c = cluster.start3()
        print(f"[{NAME}] origin {cluster.origin_http}, edges A {a.url}, B {b.url}, C {e_c.url}", flush=True)
        await asyncio.wait_for(run(cluster, a, b, e_c, c), timeout=90)
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
