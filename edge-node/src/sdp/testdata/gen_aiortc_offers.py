# Generates real aiortc offers for edge-node/src/sdp/testdata (no network: loopback only, no STUN).
import asyncio, sys
import aioice.ice
aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]
from aiortc import RTCPeerConnection, RTCConfiguration
from aiortc.mediastreams import AudioStreamTrack, VideoStreamTrack

async def offer(kind):
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    if kind == "publish":
        pc.addTrack(AudioStreamTrack()); pc.addTrack(VideoStreamTrack())
    elif kind == "publish_sendonly":
        pc.addTransceiver(AudioStreamTrack(), direction="sendonly")
        pc.addTransceiver(VideoStreamTrack(), direction="sendonly")
    elif kind == "whep":
        pc.addTransceiver("audio", direction="recvonly"); pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp

for kind in ["publish", "publish_sendonly", "whep"]:
    open(f"{sys.argv[1]}/aiortc_{kind}_offer.sdp", "w", newline="").write(asyncio.run(offer(kind)))
