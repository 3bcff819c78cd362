// Real-browser test of the media path: two headless Chromium pages (fake camera and microphone)
// join one room on a real `kcs dev` edge. Each must decode the other's camera (inbound-rtp
// framesDecoded grows). Then B asks for the lowest simulcast layer of A's camera and its decoded
// frame width must drop to the low layer (320), and back to 1280 when it asks for high again.
//
// Run: node tests/e2e/two_pages.mjs (after scripts/install-test-deps.sh and a release build).
// Screenshots and the edge log go to artifacts/.
import { startEdge, waitFor, sleep } from '../lib/edge.mjs';
import { launchChromium, openRoomPage, screenshot, waitJoined, remoteVideo, pageErrors } from '../lib/browser.mjs';

const NAME = 'two_pages';
const ROOM = `two-pages-${process.pid}`;
/** Widths of the camera's layers: 1280x720 captured, scaled down by 4 and 2 (CAMERA_ENCODINGS). */
const FULL_WIDTH = 1280;
const LOW_WIDTH = 320;
/** Chromium's bandwidth estimate ramps up to the full layer's 1.5 Mbps in seconds on loopback. */
const LAYER_TIMEOUT_MS = 30_000;

let edge;
let browser;
const pages = {};
const log = (...a) => console.log(`[${NAME}]`, ...a);

async function decodesGrowing(page, from, label) {
  const first = await waitFor(`${label} decoding ${from}'s camera`, async () => {
    const v = await remoteVideo(page, from);
    return v && v.framesDecoded > 0 ? v : null;
  }, { timeoutMs: 30_000 });
  await sleep(2000);
  const second = await remoteVideo(page, from);
  if (!second || second.framesDecoded <= first.framesDecoded) {
    throw new Error(`${label}: framesDecoded of ${from}'s camera did not grow (${first.framesDecoded} -> ${second?.framesDecoded})`);
  }
  log(`${label} decodes ${from}: framesDecoded ${first.framesDecoded} -> ${second.framesDecoded}, ${second.frameWidth}x${second.frameHeight}`);
  return second;
}

async function setQuality(page, trackId, quality) {
  await page.evaluate(([t, q]) => window.kcs.setQuality(t, q), [trackId, quality]);
}

async function waitWidth(page, from, what, pred) {
  return waitFor(what, async () => {
    const v = await remoteVideo(page, from);
    return v && pred(v.frameWidth) ? v : null;
  }, { timeoutMs: LAYER_TIMEOUT_MS, intervalMs: 500 });
}

async function main() {
  edge = await startEdge({ name: NAME });
  log(`edge at ${edge.url}, udp ${edge.udpPort}`);
  browser = await launchChromium();
  const tokens = { alice: edge.token(ROOM, 'alice'), bob: edge.token(ROOM, 'bob') };
  for (const who of ['alice', 'bob']) {
    pages[who] = await openRoomPage(browser, { base: edge.url, room: ROOM, token: tokens[who], label: who });
  }
  await Promise.all(['alice', 'bob'].map((who) => waitJoined(pages[who], who)));
  log('both pages joined and published');

  await decodesGrowing(pages.alice, 'bob', 'alice');
  const seen = await decodesGrowing(pages.bob, 'alice', 'bob');
  await screenshot(pages.bob, `${NAME}-bob-decoding`);

  const out = await pages.alice.evaluate(() => window.kcs.stats.outbound('camera'));
  log('alice sends', JSON.stringify(out.map((o) => `${o.rid}:${o.frameWidth}x${o.frameHeight}`)));

  await setQuality(pages.bob, seen.trackId, 'high');
  const high = await waitWidth(pages.bob, 'alice', `bob receiving alice at ${FULL_WIDTH}`, (w) => w >= FULL_WIDTH);
  log(`bob at high: ${high.frameWidth}x${high.frameHeight}`);

  await setQuality(pages.bob, seen.trackId, 'low');
  const low = await waitWidth(pages.bob, 'alice', `bob's width dropping to ${LOW_WIDTH} after asking for low`, (w) => w > 0 && w <= LOW_WIDTH);
  log(`bob at low: ${low.frameWidth}x${low.frameHeight}`);
  await screenshot(pages.bob, `${NAME}-bob-low`);

  await setQuality(pages.bob, seen.trackId, 'high');
  const back = await waitWidth(pages.bob, 'alice', `bob's width growing back to ${FULL_WIDTH} after asking for high`, (w) => w >= FULL_WIDTH);
  log(`bob back at high: ${back.frameWidth}x${back.frameHeight}`);
  await screenshot(pages.bob, `${NAME}-bob-high`);

  for (const who of ['alice', 'bob']) {
    const errors = await pageErrors(pages[who]);
    if (errors.length) throw new Error(`${who}'s page shows errors: ${JSON.stringify(errors)}`);
  }
}

let failed = null;
const hardTimeout = setTimeout(() => {
  console.log(`FAIL ${NAME}: hard timeout`);
  process.exit(1);
}, 150_000);
try {
  await main();
} catch (err) {
  failed = err;
  for (const [who, page] of Object.entries(pages)) {
    await screenshot(page, `${NAME}-${who}-failure`);
    log(`${who} page errors:`, JSON.stringify(await pageErrors(page)));
    log(`${who} remote video:`, JSON.stringify(await page.evaluate(() => window.kcs?.stats.remoteVideo()).catch((e) => e.message)));
  }
  if (edge) log(`edge log tail:\n${edge.tail()}`);
} finally {
  await browser?.close().catch(() => {});
  await edge?.stop();
  clearTimeout(hardTimeout);
}
if (failed) {
  console.log(`FAIL ${NAME}: ${failed.message}`);
  process.exit(1);
}
console.log(`PASS ${NAME}`);
