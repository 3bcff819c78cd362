// A subscriber behind a rate-capped link gets a lower simulcast layer instead of losing packets,
// and climbs back when the cap goes.
//
// The edge listens on the root side of a veth pair (198.51.100.0/24); the publisher page runs in
// the root namespace, the subscriber's Chromium inside a network namespace (playwright drives it
// over a pipe through `ip netns exec`). With the subscriber at the high layer, the root side's
// egress (towards the subscriber) gets `tbf rate 700kbit burst 16kb latency 200ms`: its decoded
// width must drop to <= 640 and, over a steady window, loss (packetsLost / (packetsReceived +
// packetsLost)) must stay under 2%. Without the cap it must be back at 1280 within ~30 s.
//
// The publisher's camera is a noisy test pattern (ffmpeg, fed to Chromium's fake capture) so that
// its layers cost what CAMERA_ENCODINGS allow (about 150 / 500 / 1500 kbps): Chromium's built-in
// fake camera is so compressible that its 1280x720 layer fits in 700 kbit/s at 15 fps.
//
// Needs root (exits 77, "SKIP", without). Run: node tests/e2e/throttled.mjs
import { startEdge, waitFor, sleep } from '../lib/edge.mjs';
import { launchChromium, openRoomPage, screenshot, waitJoined, remoteVideo, pageErrors } from '../lib/browser.mjs';
import { canUseNetns, createNetns } from '../lib/netns.mjs';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const NAME = 'throttled';
const ROOM = `throttled-${process.pid}`;
const FULL_WIDTH = 1280;
/** The middle layer (640x360, 500 kbps) fits a 700 kbit/s link with audio; the full one does not. */
const CAPPED_MAX_WIDTH = 640;
const CAP = { rate: '700kbit', burst: '16kb', latency: '200ms' };
/** Loss allowed on the capped link over the steady window. */
const MAX_LOSS = 0.02;
/** Let the estimator settle on the capped link before measuring loss. */
const SETTLE_MS = 5_000;
const WINDOW_MS = 10_000;
const DROP_TIMEOUT_MS = 30_000;
const RECOVER_TIMEOUT_MS = 40_000;

const log = (...a) => console.log(`[${NAME}]`, ...a);

if (!canUseNetns()) {
  console.log(`SKIP ${NAME}: needs root and iproute2 (network namespaces)`);
  process.exit(77);
}

let ns;
let edge;
let videoDir;

/**
 * Writes a 2 s loop of 1280x720 15 fps moving test pattern with temporal noise (y4m, ~40 MB):
 * a camera whose layers fill their bitrate caps.
 */
function noisyCamera() {
  videoDir = mkdtempSync(join(tmpdir(), 'kcs-throttled-'));
  const path = join(videoDir, 'camera.y4m');
  execFileSync('ffmpeg', ['-loglevel', 'error', '-y', '-f', 'lavfi',
    '-i', 'testsrc2=size=1280x720:rate=15,noise=alls=25:allf=t+u',
    '-frames:v', '30', '-pix_fmt', 'yuv420p', path]);
  return path;
}
const browsers = [];
const pages = {};

async function main() {
  ns = createNetns();
  log(`namespace ${ns.name}: root ${ns.rootIf} ${ns.rootAddr} <-> ${ns.nsIf} ${ns.nsAddr}`);
  // Everything on the veth address: the subscriber reaches only that, the publisher (root
  // namespace) reaches it locally.
  edge = await startEdge({ name: NAME, httpHost: ns.rootAddr, udpHost: ns.rootAddr });
  log(`edge at ${edge.url}, udp ${ns.rootAddr}:${edge.udpPort}`);

  // http://198.51.100.x is not a secure context: let the publisher's page use the camera there.
  const pubBrowser = await launchChromium({
    args: [`--unsafely-treat-insecure-origin-as-secure=${edge.url}`, `--use-file-for-fake-video-capture=${noisyCamera()}`],
  });
  browsers.push(pubBrowser);
  const subBrowser = await launchChromium({ executablePath: ns.wrapper('/usr/bin/chromium') });
  browsers.push(subBrowser);

  pages.pub = await openRoomPage(pubBrowser, { base: edge.url, room: ROOM, token: edge.token(ROOM, 'pub'), label: 'pub', query: { fps: '15' } });
  await waitJoined(pages.pub, 'publisher');
  pages.sub = await openRoomPage(subBrowser, {
    base: edge.url, room: ROOM, token: edge.token(ROOM, 'sub'), label: 'sub', query: { publish: '0' },
  });
  await waitJoined(pages.sub, 'subscriber');

  const first = await waitFor('subscriber decoding the publisher', async () => {
    const v = await remoteVideo(pages.sub, 'pub');
    return v && v.framesDecoded > 0 ? v : null;
  }, { timeoutMs: 30_000 });
  const trackId = first.trackId;
  await pages.sub.selectOption(`figure[data-track="${trackId}"] select.quality`, 'high');
  const high = await waitFor(`subscriber at ${FULL_WIDTH} before the cap`, async () => {
    const v = await remoteVideo(pages.sub, 'pub');
    return v && v.frameWidth >= FULL_WIDTH ? v : null;
  }, { timeoutMs: 30_000, intervalMs: 500 });
  log(`uncapped: ${high.frameWidth}x${high.frameHeight}`);

  ns.capEgress(CAP.rate, CAP.burst, CAP.latency);
  log(`capped ${ns.rootIf} egress: tbf rate ${CAP.rate} burst ${CAP.burst} latency ${CAP.latency}`);
  const t0 = Date.now();
  const dropped = await waitFor(`subscriber's width <= ${CAPPED_MAX_WIDTH} under the cap`, async () => {
    const v = await remoteVideo(pages.sub, 'pub');
    return v && v.frameWidth > 0 && v.frameWidth <= CAPPED_MAX_WIDTH ? v : null;
  }, { timeoutMs: DROP_TIMEOUT_MS, intervalMs: 500 });
  log(`dropped to ${dropped.frameWidth}x${dropped.frameHeight} after ${Date.now() - t0} ms`);

  await sleep(SETTLE_MS);
  const a = await remoteVideo(pages.sub, 'pub');
  await sleep(WINDOW_MS);
  const b = await remoteVideo(pages.sub, 'pub');
  const received = b.packetsReceived - a.packetsReceived;
  const lost = b.packetsLost - a.packetsLost;
  const loss = received + lost > 0 ? lost / (received + lost) : 1;
  log(`steady window ${WINDOW_MS} ms: received ${received}, lost ${lost}, loss ${(loss * 100).toFixed(2)}%, `
    + `width ${b.frameWidth}, frames ${b.framesDecoded - a.framesDecoded}`);
  log(`qdisc: ${ns.qdiscStats().replace(/\s+/g, ' ')}`);
  await screenshot(pages.sub, `${NAME}-sub-capped`);
  if (received <= 0) throw new Error('no video packets received in the steady window under the cap');
  if (b.framesDecoded <= a.framesDecoded) throw new Error('video froze under the cap (framesDecoded did not grow)');
  if (loss >= MAX_LOSS) throw new Error(`loss ${(loss * 100).toFixed(2)}% >= ${MAX_LOSS * 100}% under the cap`);
  if (b.frameWidth > CAPPED_MAX_WIDTH) throw new Error(`width went back up to ${b.frameWidth} under the cap`);

  ns.uncapEgress();
  const t1 = Date.now();
  const back = await waitFor(`subscriber back at ${FULL_WIDTH} without the cap`, async () => {
    const v = await remoteVideo(pages.sub, 'pub');
    return v && v.frameWidth >= FULL_WIDTH ? v : null;
  }, { timeoutMs: RECOVER_TIMEOUT_MS, intervalMs: 500 });
  log(`recovered to ${back.frameWidth}x${back.frameHeight} after ${Date.now() - t1} ms`);
  await screenshot(pages.sub, `${NAME}-sub-recovered`);
}

let failed = null;
const hardTimeout = setTimeout(() => {
  console.log(`FAIL ${NAME}: hard timeout`);
  ns?.remove();
  process.exit(1);
}, 170_000);
try {
  await main();
} catch (err) {
  failed = err;
  for (const [who, page] of Object.entries(pages)) {
    await screenshot(page, `${NAME}-${who}-failure`);
    log(`${who} page errors:`, JSON.stringify(await pageErrors(page)));
  }
  if (pages.sub) {
    log('sub remote video:', JSON.stringify(await pages.sub.evaluate(() => window.kcs?.stats.remoteVideo()).catch((e) => e.message)));
  }
  if (pages.pub) {
    log('pub outbound:', JSON.stringify(await pages.pub.evaluate(() => window.kcs?.stats.outbound('camera')).catch((e) => e.message)));
  }
  if (ns) log(`qdisc: ${ns.qdiscStats().replace(/\s+/g, ' ')}`);
  if (edge) log(`edge log tail:\n${edge.tail()}`);
} finally {
  for (const b of browsers) await b.close().catch(() => {});
  await edge?.stop();
  ns?.remove();
  if (videoDir) rmSync(videoDir, { recursive: true, force: true });
  clearTimeout(hardTimeout);
}
if (failed) {
  console.log(`FAIL ${NAME}: ${failed.message}`);
  process.exit(1);
}
console.log(`PASS ${NAME}`);
