"""VP8 simulcast for aiortc, which has none of its own (aiortc 1.16).

Why: the edge must accept simulcast from standard tools over WHIP, and a second, independent
WebRTC stack is the honest way to test that. aiortc's RTCRtpSender has one SSRC and one encoder,
takes no `sendEncodings`, and its SDP code neither writes nor reads `a=rid` / `a=simulcast`.

How, in three pieces (all test-only patches, applied by the caller in this order):
1. `enable_rid_extension()` adds `urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id` (RFC 8852) to
   aiortc's video header extensions, so that aiortc offers it and, once the answer accepts it,
   writes it into the packets (aiortc already knows how to serialize it).
2. `make_simulcast(sender, layers)` replaces one video sender's RTP loop: each frame of the track
   is scaled per layer and encoded by one VP8 encoder per layer, each layer with its own SSRC,
   sequence space and rid, all on the sender's m-line (one mid). A PLI/FIR for a layer's SSRC
   forces a keyframe of that layer only.
3. `offer_with_simulcast(sdp, rids)` rewrites the offer before it is POSTed: the video section
   gets `a=rid:<rid> send` lines and `a=simulcast:send q;h;f` (RFC 8853 section 5.1, lowest layer
   first, our convention) and loses its `a=ssrc` lines (with rids the SSRCs are learnt from the
   packets, as with browsers).

What it does not do: RTX, per-layer sender reports, REMB-driven bitrates, temporal layers.
"""

from __future__ import annotations

import asyncio
import types
from dataclasses import dataclass, field

from aiortc import RTCRtpSender
from aiortc.codecs import HEADER_EXTENSIONS, get_encoder
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters
from aiortc.rtp import RTCP_PSFB_FIR, RTCP_PSFB_PLI, RtcpPsfbPacket, RtpPacket
from aiortc.utils import random32, uint16_add, uint32_add

RID_URI = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id"
# aiortc uses ids 1-3 across audio and video (one id space under BUNDLE); 4 is free.
RID_EXT_ID = 4


@dataclass
class Layer:
    """One simulcast encoding: `scale` divides width and height."""

    rid: str
    scale: int
    bitrate: int
    ssrc: int = field(default_factory=random32)
    seq: int = field(default_factory=lambda: random32() & 0xFFFF)
    force_keyframe: bool = False
    packets: int = 0
    encoder: object = None


def enable_rid_extension() -> None:
    if not any(ext.uri == RID_URI for ext in HEADER_EXTENSIONS["video"]):
        HEADER_EXTENSIONS["video"].append(RTCRtpHeaderExtensionParameters(id=RID_EXT_ID, uri=RID_URI))


def make_simulcast(sender: RTCRtpSender, layers: list[Layer]) -> list[Layer]:
    """Turns a video sender (before negotiation) into a simulcast one; returns its layers."""

    async def run_rtp(self, codec) -> None:
        started = self._RTCRtpSender__rtp_started
        exited = self._RTCRtpSender__rtp_exited
        started.set()
        mid = self._RTCRtpSender__mid
        ext_map = self._RTCRtpSender__rtp_header_extensions_map
        loop = asyncio.get_event_loop()
        for layer in layers:
            layer.encoder = get_encoder(codec)
            layer.encoder.target_bitrate = layer.bitrate
            self.transport._rtp_router.register_sender(self, layer.ssrc)
        timestamp_origin = random32()
        try:
            while True:
                frame = await self.track.recv()
                for layer in layers:
                    scaled = frame
                    if layer.scale != 1:
                        scaled = frame.reformat(
                            width=frame.width // layer.scale, height=frame.height // layer.scale
                        )
                        scaled.pts = frame.pts
                        scaled.time_base = frame.time_base
                    keyframe, layer.force_keyframe = layer.force_keyframe, False
                    payloads, ts = await loop.run_in_executor(
                        None, layer.encoder.encode, scaled, keyframe
                    )
                    for i, payload in enumerate(payloads):
                        packet = RtpPacket(
                            payload_type=codec.payloadType,
                            sequence_number=layer.seq,
                            timestamp=uint32_add(timestamp_origin, ts),
                        )
                        packet.ssrc = layer.ssrc
                        packet.payload = payload
                        packet.marker = 1 if i == len(payloads) - 1 else 0
                        packet.extensions.mid = mid
                        packet.extensions.rtp_stream_id = layer.rid
                        await self.transport._send_rtp(packet.serialize(ext_map))
                        layer.seq = uint16_add(layer.seq, 1)
                        layer.packets += 1
        except (asyncio.CancelledError, ConnectionError, MediaStreamError):
            pass
        finally:
            exited.set()

    original_rtcp = sender._handle_rtcp_packet

    async def handle_rtcp(self, packet) -> None:
        if isinstance(packet, RtcpPsfbPacket) and packet.fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
            for layer in layers:
                if layer.ssrc == packet.media_ssrc:
                    layer.force_keyframe = True
            return
        await original_rtcp(packet)

    sender._run_rtp = types.MethodType(run_rtp, sender)
    sender._handle_rtcp_packet = types.MethodType(handle_rtcp, sender)
    return layers


def offer_with_simulcast(sdp: str, rids: list[str]) -> str:
    """Adds rid/simulcast lines to the (only) video section and drops its ssrc lines."""
    lines = sdp.split("\r\n")
    out: list[str] = []
    in_video = False
    for line in lines:
        if line.startswith("m="):
            if in_video:
                out.extend(_simulcast_lines(rids))
            in_video = line.startswith("m=video")
        if in_video and (line.startswith("a=ssrc:") or line.startswith("a=ssrc-group:")):
            continue
        if line == "" and in_video:
            out.extend(_simulcast_lines(rids))
            in_video = False
        out.append(line)
    return "\r\n".join(out)


def _simulcast_lines(rids: list[str]) -> list[str]:
    return [f"a=rid:{rid} send" for rid in rids] + [f"a=simulcast:send {';'.join(rids)}"]
