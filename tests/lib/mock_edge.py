#!/usr/bin/env python3
"""A stand-in edge for developing the web client while the real one is being written.

It serves edge-node/web/ at `/`, answers `/healthz` and the dev-only `/dev/token`, and speaks the
client protocol of docs/protocol.md on `/ws` with aiortc as the media engine: the publisher PC is
answered by aiortc, the subscriber PC is offered by aiortc carrying the other participants' tracks
(re-encoded through aiortc's MediaRelay). It is NOT an SFU and proves nothing about ours: no
simulcast (aiortc accepts no `a=simulcast`, so Chromium sends only its first encoding),
`consumer:layers` / pause / resume are acked and ignored. Its only use is checking the page,
kcs-client.js and the test scripts' plumbing:

    python3 tests/lib/mock_edge.py --http 127.0.0.1:8080

Tokens: `/dev/token?room=R` returns `mock:R:<identity>`; any such string is accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import secrets
import sys
from pathlib import Path

import aioice.ice

# aiortc gathers only non-loopback addresses: gather the HTTP listener's address instead.
ICE_HOST = ["127.0.0.1"]
aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: list(ICE_HOST)

from aiohttp import WSMsgType, web  # noqa: E402
from aiortc import RTCPeerConnection, RTCSessionDescription  # noqa: E402
from aiortc.contrib.media import MediaRelay  # noqa: E402

WEB = Path(__file__).resolve().parents[2] / "edge-node" / "web"
relay = MediaRelay()
ids = itertools.count(1)


class Participant:
    def __init__(self, room: "Room", ws: web.WebSocketResponse, identity: str) -> None:
        self.room = room
        self.ws = ws
        self.id = f"p{next(ids)}"
        self.identity = identity
        self.pub = RTCPeerConnection()
        self.sub: RTCPeerConnection | None = None
        self.revision = 0
        self.sent: dict[str, str] = {}  # track id -> mid on our subscriber PC
        self.lock = asyncio.Lock()
        self.received: dict[str, object] = {}  # mid -> aiortc track from the publisher PC
        self.tracks: dict[str, dict] = {}  # our published tracks by id
        self.pub.on("track", lambda t: None)

    def info(self) -> dict:
        return {"id": self.id, "identity": self.identity, "name": self.identity, "role": "host"}

    async def send(self, msg: dict) -> None:
        if not self.ws.closed:
            try:
                await self.ws.send_str(json.dumps(msg))
            except ConnectionError:
                pass

    async def renegotiate(self) -> None:
        """Offers every other participant's track on the subscriber PC."""
        async with self.lock:
            if self.sub is None:
                self.sub = RTCPeerConnection()
            wanted = {
                tid: t
                for other in self.room.members.values()
                if other is not self
                for tid, t in other.tracks.items()
                if "source_track" in t
            }
            added = False
            for tid, t in wanted.items():
                if tid in self.sent:
                    continue
                tr = self.sub.addTransceiver(relay.subscribe(t["source_track"]), direction="sendonly")
                tr._kcs_track = tid
                self.sent[tid] = ""
                added = True
            if not added:
                return
            await self.sub.setLocalDescription(await self.sub.createOffer())
            tracks = []
            for tr in self.sub.getTransceivers():
                tid = tr._kcs_track
                self.sent[tid] = tr.mid
                t = wanted[tid]
                tracks.append({"mid": tr.mid, "track": tid, "participant": t["participant"],
                               "source": t["source"], "kind": t["kind"]})
            self.revision += 1
            await self.send({"type": "sdp:offer", "revision": self.revision,
                             "sdp": self.sub.localDescription.sdp, "tracks": tracks})


class Room:
    def __init__(self) -> None:
        self.members: dict[str, Participant] = {}
        self.seq = 0

    async def broadcast(self, msg: dict, skip: Participant | None = None) -> None:
        self.seq += 1
        for p in list(self.members.values()):
            if p is not skip:
                await p.send({**msg, "seq": self.seq})


rooms: dict[str, Room] = {}


async def ws_handler(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=64 * 1024)
    await ws.prepare(request)
    me: Participant | None = None
    async for frame in ws:
        if frame.type != WSMsgType.TEXT:
            continue
        msg = json.loads(frame.data)
        rid, kind = msg.get("id"), msg.get("type")

        async def ack(**result):
            await ws.send_str(json.dumps({"type": "ack", "id": rid, **result}))

        async def err(code, message):
            await ws.send_str(json.dumps({"type": "error", "id": rid, "code": code, "message": message}))

        if kind == "hello":
            await ack(version=1, server="mock-edge")
        elif kind == "room:join":
            parts = str(msg.get("token", "")).split(":")
            if len(parts) != 3 or parts[0] != "mock":
                await err("token_malformed", "mock tokens are mock:<room>:<identity>")
                continue
            room = rooms.setdefault(parts[1], Room())
            me = Participant(room, ws, parts[2])
            await ack(room=parts[1], you=me.info(),
                      participants=[p.info() for p in room.members.values()],
                      tracks=[{k: v for k, v in t.items() if k != "source_track"}
                              for p in room.members.values() for t in p.tracks.values()],
                      seq=room.seq)
            room.members[me.id] = me
            await room.broadcast({"type": "participant:joined", "participant": me.info()}, skip=me)
            asyncio.ensure_future(me.renegotiate())
        elif me is None:
            await err("not_joined", "join first")
        elif kind == "produce":
            await me.pub.setRemoteDescription(RTCSessionDescription(msg["sdp"], "offer"))
            await me.pub.setLocalDescription(await me.pub.createAnswer())
            out = []
            new = []
            for entry in msg.get("tracks", []):
                tr = next(t for t in me.pub.getTransceivers() if t.mid == entry["mid"])
                existing = next((t for t in me.tracks.values() if t["mid"] == entry["mid"]), None)
                if existing is None:
                    tid = f"t{next(ids)}"
                    existing = {"id": tid, "participant": me.id, "source": entry["source"],
                                "kind": tr.kind, "codec": "vp8" if tr.kind == "video" else "opus",
                                "layers": 1, "muted": False, "mid": entry["mid"],
                                "source_track": tr.receiver.track}
                    me.tracks[tid] = existing
                    new.append(existing)
                out.append({"mid": entry["mid"], "track": existing["id"]})
            await ack(sdp=me.pub.localDescription.sdp, tracks=out)
            for t in new:
                await me.room.broadcast({"type": "track:published", "track": {
                    k: v for k, v in t.items() if k not in ("source_track", "mid")}})
            for other in me.room.members.values():
                if other is not me:
                    asyncio.ensure_future(other.renegotiate())
        elif kind == "sdp:answer":
            if me.sub is None or msg.get("revision") != me.revision:
                await err("stale_revision", f"current revision is {me.revision}")
                continue
            await me.sub.setRemoteDescription(RTCSessionDescription(msg["sdp"], "answer"))
            await ack()
        elif kind in ("consume", "consumer:close", "consumer:pause", "consumer:resume",
                      "consumer:layers", "media:unpublish"):
            print(f"mock-edge: {me.identity} {kind} {json.dumps({k: v for k, v in msg.items() if k not in ('id', 'type')})}",
                  flush=True)
            await ack()
        elif kind == "room:leave":
            await ack()
            break
        else:
            await err("unknown_type", f"unknown type {kind}")
    if me is not None:
        me.room.members.pop(me.id, None)
        await me.room.broadcast({"type": "participant:left", "participant": me.id})
        await me.pub.close()
        if me.sub:
            await me.sub.close()
    return ws


whip_sessions: dict[str, tuple[str, RTCPeerConnection, list]] = {}  # id -> (room, pc, tracks)
room_publishers: dict[str, list[str]] = {}  # room -> WHIP session ids, latest last


def bearer_ok(request: web.Request, room: str) -> bool:
    auth = request.headers.get("Authorization", "")
    parts = auth.removeprefix("Bearer ").split(":")
    return auth.startswith("Bearer ") and len(parts) == 3 and parts[0] == "mock" and parts[1] == room


async def sdp_exchange(request: web.Request, kind: str) -> web.Response:
    room = request.match_info["room"]
    if not bearer_ok(request, room):
        return web.Response(status=401, text="missing or bad token", headers={"WWW-Authenticate": "Bearer"})
    if request.content_type != "application/sdp":
        return web.Response(status=415, text="expected application/sdp")
    pc = RTCPeerConnection()
    tracks: list = []
    if kind == "whep":
        sessions = [whip_sessions[s] for s in room_publishers.get(room, []) if s in whip_sessions]
        if not sessions:
            return web.Response(status=404, text="no publisher in this room")
        for track in sessions[-1][2]:
            pc.addTrack(relay.subscribe(track))
    else:
        pc.on("track", lambda track: tracks.append(track))
    try:
        await pc.setRemoteDescription(RTCSessionDescription(await request.text(), "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
    except Exception as err:  # aiortc's parse errors are of many types
        await pc.close()
        return web.Response(status=400, text=f"bad SDP offer: {err}")
    session = secrets.token_hex(4)
    whip_sessions[session] = (room, pc, tracks)
    if kind == "whip":
        room_publishers.setdefault(room, []).append(session)
    return web.Response(status=201, text=pc.localDescription.sdp, content_type="application/sdp",
                        headers={"Location": f"/{kind}/{room}/{session}"})


async def sdp_delete(request: web.Request) -> web.Response:
    room = request.match_info["room"]
    if not bearer_ok(request, room):
        return web.Response(status=401, text="missing or bad token", headers={"WWW-Authenticate": "Bearer"})
    entry = whip_sessions.pop(request.match_info["session"], None)
    if entry is None:
        return web.Response(status=404, text="no such session")
    await entry[1].close()
    return web.Response(status=200)


async def dev_token(request: web.Request) -> web.Response:
    room = request.query.get("room", "")
    return web.json_response({"token": f"mock:{room}:guest-{secrets.token_hex(3)}"})


def static(name: str, ctype: str):
    async def handler(_request: web.Request) -> web.Response:
        return web.Response(body=(WEB / name).read_bytes(), content_type=ctype)
    return handler


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--http", default="127.0.0.1:8080")
    args = ap.parse_args()
    host, port = args.http.rsplit(":", 1)
    ICE_HOST[0] = host
    app = web.Application()
    app.router.add_get("/", static("index.html", "text/html"))
    app.router.add_get("/app.js", static("app.js", "text/javascript"))
    app.router.add_get("/kcs-client.js", static("kcs-client.js", "text/javascript"))
    app.router.add_get("/style.css", static("style.css", "text/css"))
    app.router.add_get("/basic", static("basic.html", "text/html"))
    app.router.add_get("/meet.js", static("meet.js", "text/javascript"))
    app.router.add_get("/meet-layout.js", static("meet-layout.js", "text/javascript"))
    app.router.add_get("/meet.css", static("meet.css", "text/css"))
    app.router.add_get("/healthz", lambda r: asyncio.sleep(0, web.Response(text="ok")))
    app.router.add_get("/dev/token", dev_token)
    app.router.add_get("/ws", ws_handler)
    app.router.add_post("/whip/{room}", lambda r: sdp_exchange(r, "whip"))
    app.router.add_post("/whep/{room}", lambda r: sdp_exchange(r, "whep"))
    app.router.add_delete("/whip/{room}/{session}", sdp_delete)
    app.router.add_delete("/whep/{room}/{session}", sdp_delete)
    print(f"mock-edge: http://{host}:{port}/basic?room=test", flush=True)
    web.run_app(app, host=host, port=int(port), print=None)


if __name__ == "__main__":
    sys.exit(main())
