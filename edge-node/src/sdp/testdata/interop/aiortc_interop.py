"""aiortc against the edge's SDP code: publish, WHEP and subscriber flows.

usage: aiortc_interop.py TEST_BINARY OUT_DIR   (prints one line per result)
Loopback only: host addresses patched to 127.0.0.1, no STUN servers.
"""
import asyncio, os, subprocess, sys, tempfile
import aioice.ice
aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, VideoStreamTrack

BIN, OUT = sys.argv[1], sys.argv[2]


def edge(mode, sdp=""):
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "in.sdp"), os.path.join(d, "out.txt")
        open(src, "w", newline="").write(sdp)
        env = dict(os.environ, KCS_SDP_MODE=mode, KCS_SDP_IN=src, KCS_SDP_OUT=dst)
        subprocess.run([BIN, "sdp::interop::interop_step", "--ignored", "--exact", "--quiet"],
                       env=env, check=True, capture_output=True, timeout=60)
        out = open(dst).read()
    if out.startswith("ERROR"):
        raise RuntimeError(out)
    return out


def pc():
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


async def publish():
    p = pc()
    p.addTransceiver(AudioStreamTrack(), direction="sendonly")
    p.addTransceiver(VideoStreamTrack(), direction="sendonly")
    await p.setLocalDescription(await p.createOffer())
    answer = edge("publish", p.localDescription.sdp)
    await p.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    dirs = ",".join(t.currentDirection for t in p.getTransceivers())
    await p.close()
    assert dirs == "sendonly,sendonly", dirs
    return "directions=" + dirs


async def whep():
    p = pc()
    p.addTransceiver("audio", direction="recvonly")
    p.addTransceiver("video", direction="recvonly")
    await p.setLocalDescription(await p.createOffer())
    answer = edge("whep", p.localDescription.sdp)
    await p.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    dirs = ",".join(t.currentDirection for t in p.getTransceivers())
    await p.close()
    assert dirs == "recvonly,recvonly", dirs
    return "directions=" + dirs


async def subscriber():
    p = pc()
    await p.setRemoteDescription(RTCSessionDescription(edge("suboffer"), "offer"))
    await p.setLocalDescription(await p.createAnswer())
    sdp = p.localDescription.sdp
    open(os.path.join(OUT, "aiortc_subscriber_answer.sdp"), "w", newline="").write(sdp)
    parsed = edge("subanswer", sdp)
    await p.close()
    return parsed


async def main():
    for name, fn in [("aiortc_publish", publish), ("aiortc_whep", whep), ("aiortc_subscriber", subscriber)]:
        try:
            print(name, "OK", await fn(), flush=True)
        except Exception as e:  # report and go on to the next scenario
            print(name, "FAIL", repr(e), flush=True)

asyncio.run(main())
