#!/usr/bin/env python3
"""WHIP in, WHEP out, with aiortc: a WebRTC stack that is not ours.

Against a real `kcs dev` edge, in two rooms:
1. plain: an aiortc peer publishes VP8 + Opus over WHIP (RFC 9725), a second aiortc peer plays
   the room over WHEP: video frames decoded at the size sent, audio frames received;
2. simulcast: the same with VP8 in three rid layers (q 160x120, h 320x240, f 640x480, lowest
   first): the room (seen by a WebSocket client) lists the camera with 3 layers, and the WHEP
   player decodes frames of one of the layers' sizes, and audio.
Then the error answers a standard tool relies on: 401 without a token, 400 with a reason for bad
SDP, 415 for a wrong content type, 404 for an unknown session or a room without a publisher.

aiortc 1.16 cannot send simulcast by itself (one SSRC and one encoder per sender, no
`sendEncodings`, no `a=rid` / `a=simulcast` in its SDP code): aiortc_simulcast.py beside this
file adds it for the test (rid header extension, one encoder/SSRC per layer, offer rewriting).

aiortc gathers only non-loopback host candidates; the edge here listens on loopback, so aioice's
host address discovery is patched to 127.0.0.1 (shared/guides/testing.md).

Run: python3 tests/interop/test_whip_whep.py  (prints PASS/FAIL, exits non-zero on failure)
"""

from __future__ import annotations

import asyncio
import fractions
import json
import math
import os
import sys
import time
from array import array
from pathlib import Path
from urllib.parse import urljoin

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import aioice.ice  # noqa: E402

aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]

import aiohttp  # noqa: E402
from aiortc import (  # noqa: E402
    MediaStreamTrack,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError  # noqa: E402
from av import AudioFrame, VideoFrame  # noqa: E402
from kcs_edge import Edge  # noqa: E402

import aiortc_simulcast as simulcast  # noqa: E402

simulcast.enable_rid_extension()

NAME = "whip_whep"
ROOM = f"whip-whep-{os.getpid()}"
SIMULCAST_ROOM = f"whip-whep-simulcast-{os.getpid()}"
# (rid, scale-down, bitrate), lowest first: our convention, as in the web client.
SIMULCAST_LAYERS = [("q", 4, 150_000), ("h", 2, 500_000), ("f", 1, 1_500_000)]
WIDTH, HEIGHT = 640, 480
FPS = 30
AUDIO_RATE = 48_000
AUDIO_PTIME = 0.020
# 2 s of 30 fps video and 2 s of 20 ms audio frames: well past any start-up transient, and
# reached in a few seconds on a healthy path.
MIN_VIDEO_FRAMES = 60
MIN_AUDIO_FRAMES = 100
MEDIA_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 15.0
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=10)


class MovingBarTrack(MediaStreamTrack):
    """640x480 video at 30 fps: a bright bar that moves, so the encoder sends real frames."""

    kind = "video"

    def __init__(self) -> None:
        super().__init__()
        self._n = 0
        self._start = 0.0

    async def recv(self) -> VideoFrame:
        if self._n == 0:
            self._start = time.monotonic()
        else:
            await asyncio.sleep(max(0.0, self._start + self._n / FPS - time.monotonic()))
        frame = VideoFrame(width=WIDTH, height=HEIGHT, format="yuv420p")
        y, u, v = frame.planes
        bar = (self._n * 8) % WIDTH
        row = bytearray(b"\x30" * y.line_size)
        row[bar : bar + 40] = b"\xeb" * len(row[bar : bar + 40])
        y.update(bytes(row) * HEIGHT)
        u.update(b"\x80" * u.buffer_size)
        v.update(b"\x80" * v.buffer_size)
        frame.pts = self._n * (90_000 // FPS)
        frame.time_base = fractions.Fraction(1, 90_000)
        self._n += 1
        return frame


class ToneTrack(MediaStreamTrack):
    """A 440 Hz tone, 48 kHz mono, 20 ms frames."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._n = 0
        self._start = 0.0
        samples = int(AUDIO_RATE * AUDIO_PTIME)
        self._period = [
            int(8000 * math.sin(2 * math.pi * 440 * i / AUDIO_RATE)) for i in range(AUDIO_RATE // 40)
        ]
        self._samples = samples

    async def recv(self) -> AudioFrame:
        if self._n == 0:
            self._start = time.monotonic()
        else:
            await asyncio.sleep(max(0.0, self._start + self._n * AUDIO_PTIME - time.monotonic()))
        offset = (self._n * self._samples) % len(self._period)
        pcm = array("h", (self._period[(offset + i) % len(self._period)] for i in range(self._samples)))
        frame = AudioFrame(format="s16", layout="mono", samples=self._samples)
        frame.planes[0].update(pcm.tobytes())
        frame.sample_rate = AUDIO_RATE
        frame.pts = self._n * self._samples
        frame.time_base = fractions.Fraction(1, AUDIO_RATE)
        self._n += 1
        return frame


class Checks:
    """Named checks: each prints one line; the test fails when any failed."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        print(f"  {'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
        if not ok:
            self.failed.append(name)
        return ok


async def wait_connected(pc: RTCPeerConnection, label: str) -> None:
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while pc.connectionState != "connected":
        if pc.connectionState in ("failed", "closed"):
            raise RuntimeError(f"{label} peer connection {pc.connectionState}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{label} not connected within {CONNECT_TIMEOUT_S} s ({pc.connectionState})")
        await asyncio.sleep(0.1)


def prefer_vp8(transceiver) -> None:
    codecs = RTCRtpSender.getCapabilities("video").codecs
    transceiver.setCodecPreferences([c for c in codecs if c.mimeType in ("video/VP8", "video/rtx")])


async def post_sdp(http, url, sdp, token=None, content_type="application/sdp"):
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with http.post(url, data=sdp.encode(), headers=headers) as res:
        return res.status, dict(res.headers), await res.text()


async def delete(http, url, token):
    async with http.delete(url, headers={"Authorization": f"Bearer {token}"}) as res:
        return res.status, await res.text()


async def negative_cases(c: Checks, http, edge: Edge, pub_token: str, sample_offer: str) -> None:
    whip = f"{edge.url}/whip/{ROOM}"
    status, headers, body = await post_sdp(http, whip, sample_offer, token=None)
    c.check("WHIP without token -> 401", status == 401, f"{status} {body[:120]!r}")
    c.check(
        "401 carries WWW-Authenticate: Bearer",
        headers.get("WWW-Authenticate", "").lower().startswith("bearer"),
        repr(headers.get("WWW-Authenticate")),
    )
    status, _, body = await post_sdp(http, whip, sample_offer, token="not-a-token")
    c.check("WHIP with a forged token -> 401", status == 401, f"{status} {body[:120]!r}")
    status, _, body = await post_sdp(http, whip, "v=0\r\nthis is not an offer\r\n", token=pub_token)
    c.check("WHIP with bad SDP -> 400 with a reason", status == 400 and body.strip() != "", f"{status} {body[:160]!r}")
    status, _, body = await post_sdp(http, whip, sample_offer, token=pub_token, content_type="application/json")
    c.check("WHIP with Content-Type application/json -> 415", status == 415, f"{status} {body[:120]!r}")
    status, body = await delete(http, f"{whip}/no-such-session", pub_token)
    c.check("DELETE of an unknown WHIP session -> 404", status == 404, f"{status} {body[:120]!r}")


async def room_tracks(edge: Edge, room: str) -> list[dict]:
    """The room's tracks as a signaling client sees them (join ack), without subscribing."""
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        async with http.ws_connect(edge.url.replace("http", "ws", 1) + "/ws") as ws:
            await ws.send_json({"id": 1, "type": "hello", "version": 1})
            await ws.send_json({"id": 2, "type": "room:join", "token": edge.token(room, "observer"),
                                "autoSubscribe": False})
            while True:
                msg = await ws.receive_json(timeout=10)
                if msg.get("id") == 2:
                    if msg.get("type") != "ack":
                        raise RuntimeError(f"room:join failed: {msg}")
                    await ws.send_json({"id": 3, "type": "room:leave"})
                    return msg.get("tracks", [])


async def publish_and_play(c: Checks, http, edge: Edge, room: str, layers: list | None,
                           play_edge=None) -> int:
    """One WHIP publisher (simulcast when `layers`), one WHEP player; checks and DELETEs.
    The player plays from `play_edge` (another edge of a cascade) when given.
    Returns how many frames (video and audio) the player decoded."""
    tag = "simulcast" if layers else "plain"
    play_edge = play_edge or edge
    pub_token = edge.token(room, f"whip-pub-{tag}")
    sub_token = play_edge.token(room, f"whep-sub-{tag}")
    pub = RTCPeerConnection()
    sub = RTCPeerConnection()
    consumers: list[asyncio.Task] = []
    counts = {"video": 0, "audio": 0}
    try:
        video_tx = pub.addTransceiver(MovingBarTrack(), direction="sendonly")
        prefer_vp8(video_tx)
        sent_layers = []
        if layers:
            sent_layers = simulcast.make_simulcast(
                video_tx.sender, [simulcast.Layer(rid, scale, rate) for rid, scale, rate in layers]
            )
        pub.addTransceiver(ToneTrack(), direction="sendonly")
        await pub.setLocalDescription(await pub.createOffer())
        offer = pub.localDescription.sdp
        if layers:
            offer = simulcast.offer_with_simulcast(offer, [rid for rid, _, _ in layers])

        status, headers, answer = await post_sdp(http, f"{edge.url}/whip/{room}", offer, pub_token)
        if not c.check(f"[{tag}] WHIP publish -> 201 with Location", status == 201 and "Location" in headers,
                       f"{status} {answer[:200]!r}"):
            return
        pub_location = urljoin(edge.url + "/", headers["Location"])
        if layers:
            c.check(f"[{tag}] WHIP answer accepts the simulcast", "a=simulcast:recv" in answer
                    and all(f"a=rid:{rid} recv" in answer for rid, _, _ in layers),
                    " / ".join(l for l in answer.split("\r\n") if "rid" in l or "simulcast" in l))
        await pub.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await wait_connected(pub, f"{tag} WHIP publisher")
        c.check(f"[{tag}] WHIP publisher connected (ICE + DTLS)", True)

        # Play over WHEP.
        sizes: set[tuple[int, int]] = set()

        async def consume(track) -> None:
            while True:
                try:
                    frame = await track.recv()
                except MediaStreamError:  # the track ended
                    return
                counts[track.kind] += 1
                if track.kind == "video":
                    sizes.add((frame.width, frame.height))

        @sub.on("track")
        def on_track(track) -> None:
            consumers.append(asyncio.ensure_future(consume(track)))

        sub.addTransceiver("video", direction="recvonly")
        sub.addTransceiver("audio", direction="recvonly")
        await sub.setLocalDescription(await sub.createOffer())
        status, headers, answer = await post_sdp(http, f"{play_edge.url}/whep/{room}", sub.localDescription.sdp, sub_token)
        if not c.check(f"[{tag}] WHEP play -> 201 with Location", status == 201 and "Location" in headers,
                       f"{status} {answer[:200]!r}"):
            return
        sub_location = urljoin(play_edge.url + "/", headers["Location"])
        await sub.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await wait_connected(sub, f"{tag} WHEP player")

        deadline = time.monotonic() + MEDIA_TIMEOUT_S
        while time.monotonic() < deadline and (
            counts["video"] < MIN_VIDEO_FRAMES or counts["audio"] < MIN_AUDIO_FRAMES
        ):
            await asyncio.sleep(0.25)
        c.check(f"[{tag}] WHEP decoded > {MIN_VIDEO_FRAMES} video frames", counts["video"] >= MIN_VIDEO_FRAMES,
                f"{counts['video']} frames")
        if layers:
            expected = {(WIDTH // scale, HEIGHT // scale) for _, scale, _ in layers}
            c.check(f"[{tag}] decoded frames have a layer's size", bool(sizes) and sizes <= expected,
                    f"sizes {sorted(sizes)}, layers {sorted(expected)}; packets sent per layer "
                    + ", ".join(f"{l.rid}={l.packets}" for l in sent_layers))
            tracks = await room_tracks(edge, room)
            video = [t for t in tracks if t.get("kind") == "video"]
            c.check(f"[{tag}] the room lists the camera with {len(layers)} layers",
                    len(video) == 1 and video[0].get("layers") == len(layers), json.dumps(video))
        else:
            c.check(f"[{tag}] decoded frames are {WIDTH}x{HEIGHT}", sizes == {(WIDTH, HEIGHT)},
                    f"sizes {sorted(sizes)}")
        c.check(f"[{tag}] WHEP received > {MIN_AUDIO_FRAMES} audio frames", counts["audio"] >= MIN_AUDIO_FRAMES,
                f"{counts['audio']} frames")

        status, body = await delete(http, sub_location, sub_token)
        c.check(f"[{tag}] DELETE of the WHEP session -> 2xx", 200 <= status < 300, f"{status} {body[:120]!r}")
        status, body = await delete(http, pub_location, pub_token)
        c.check(f"[{tag}] DELETE of the WHIP session -> 2xx", 200 <= status < 300, f"{status} {body[:120]!r}")
        status, body = await delete(http, pub_location, pub_token)
        c.check(f"[{tag}] DELETE of the same WHIP session again -> 404", status == 404, f"{status} {body[:120]!r}")
    finally:
        for task in consumers:
            task.cancel()
        await pub.close()
        await sub.close()
    return counts["video"] + counts["audio"]


async def run(edge: Edge, c: Checks) -> None:
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        token = edge.token(ROOM, "prober")
        # A room with no publisher yet has nothing to play.
        probe = RTCPeerConnection()
        try:
            probe.addTransceiver("video", direction="recvonly")
            await probe.setLocalDescription(await probe.createOffer())
            status, _, body = await post_sdp(http, f"{edge.url}/whep/{ROOM}", probe.localDescription.sdp, token)
            c.check("WHEP of a room without publisher -> 404", status == 404, f"{status} {body[:120]!r}")
            # The error answers, with a valid offer where one is needed.
            offer_pc = RTCPeerConnection()
            offer_pc.addTransceiver(MovingBarTrack(), direction="sendonly")
            await offer_pc.setLocalDescription(await offer_pc.createOffer())
            await negative_cases(c, http, edge, token, offer_pc.localDescription.sdp)
            await offer_pc.close()
        finally:
            await probe.close()
        await publish_and_play(c, http, edge, ROOM, None)
        await publish_and_play(c, http, edge, SIMULCAST_ROOM, SIMULCAST_LAYERS)


async def main() -> int:
    c = Checks()
    edge = Edge(NAME)
    try:
        edge.start()
        print(f"[{NAME}] edge at {edge.url}, udp {edge.udp_port}", flush=True)
        await asyncio.wait_for(run(edge, c), timeout=110)
    except Exception as err:  # the reason goes in the FAIL line
        c.failed.append(f"{type(err).__name__}: {err}")
    finally:
        if c.failed:
            print(f"[{NAME}] edge log tail:\n{edge.tail()}", flush=True)
        edge.stop()
    if c.failed:
        print(f"FAIL {NAME}: {'; '.join(c.failed)}", flush=True)
        return 1
    print(f"PASS {NAME}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
