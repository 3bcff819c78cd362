// Real-browser test of the media path: two headless Chromium pages (fake camera and microphone)
// join one room on a real `kcs dev` edge. Each must decode the other's camera (inbound-rtp
// framesDecoded grows) and hear the other's microphone (audio samples arrive). Once A sends its
// three simulcast layers, B asks for the highest layer of A's camera and must decode it at the
// width of A's top encoding (1280 unless Chromium scaled A down for CPU: at least 640); asked
// for the lowest layer, B's width must drop to A's lowest encoding (320 for 1280); asked for high
// again, it must grow back. Finally A leaves with the page's button and B's tile of A goes away.
//
// Run: node tests/e2e/two_pages.mjs (after scripts/install-test-deps.sh and a build of kcs).
// Screenshots and the edge log go to artifacts/.
import { startEdge, waitFor, sleep } from '../lib/edge.mjs';
import { launchChromium, openRoomPage, screenshot, waitJoined, remoteVideo, remoteAudio, pageErrors } from '../lib/browser.mjs';

const NAME = 'two_pages';
const ROOM = `two-pages-${process.pid}`;
/**
 * The camera captures 1280x720, scaled down by 4 and 2 for the lower layers (CAMERA_ENCODINGS).
 * Chromium may scale all layers down when the machine's CPU is overused (2 cores, two encoders
 * and two decoders here), so the test compares with what A actually sends, within these bounds.
 */
const MIN_TOP_WIDTH = 640;
const MAX_LOW_WIDTH = 320;
/** A 15 fps camera halves the encoding work of the default 30 (the fake device offers both). */
const FPS = '15';
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
  // Polled, as in meeting.mjs: a first frame of the low layer may be followed by a switch up (or
  // a lost packet) that waits for a keyframe, which takes seconds on a loaded 2-core machine.
  let last;
  const second = await waitFor(`${label}'s frames of ${from}'s camera growing past ${first.framesDecoded}`, async () => {
    last = await remoteVideo(page, from);
    return last && last.framesDecoded > first.framesDecoded ? last : null;
  }, { timeoutMs: 10_000 }).catch(() => {
    throw new Error(`${label}: framesDecoded of ${from}'s camera did not grow (${first.framesDecoded} -> ${last?.framesDecoded})`);
  });
  log(`${label} decodes ${from}: framesDecoded ${first.framesDecoded} -> ${second.framesDecoded}, ${second.frameWidth}x${second.frameHeight}`);
  return second;
}

/** `label` receives `from`'s microphone: audio samples keep arriving. */
async function hearsGrowing(page, from, label) {
  const first = await waitFor(`${label} receiving ${from}'s microphone`, async () => {
    const a = await remoteAudio(page, from);
    return a && a.totalSamplesReceived > 0 ? a : null;
  }, { timeoutMs: 15_000 }).catch(async (err) => {
    // What the subscriber PC carries tells a missing offer from missing packets.
    const mlines = await page.evaluate(() => window.kcs.client.subPc?.getTransceivers()
      .map((t) => `${t.mid}:${t.receiver.track.kind}:${t.currentDirection}`)).catch((e) => e.message);
    throw new Error(`${err.message}; ${label}'s subscriber m-lines ${JSON.stringify(mlines)}, `
      + `sdp:offer revision ${await page.evaluate(() => window.kcs.client.subRevision)}`);
  });
  await sleep(1000);
  const second = await remoteAudio(page, from);
  if (!second || second.totalSamplesReceived <= first.totalSamplesReceived) {
    throw new Error(`${label}: audio samples of ${from}'s microphone did not grow (${first.totalSamplesReceived} -> ${second?.totalSamplesReceived})`);
  }
  log(`${label} hears ${from}: samples ${first.totalSamplesReceived} -> ${second.totalSamplesReceived}, packets ${second.packetsReceived}`);
}

/** Picks a quality in the tile's selector, as a user would. */
async function setQuality(page, trackId, quality) {
  await page.selectOption(`figure[data-track="${trackId}"] select.quality`, quality);
}

/**
 * Waits until bob's decoded video of alice's camera satisfies `pred(video, sentWidths)`, where
 * `sentWidths` are the widths of alice's active encodings, ascending.
 */
async function waitLayer(page, what, pred) {
  let last;
  try {
    return await waitFor(`bob receiving alice's ${what} layer`, async () => {
      const v = await remoteVideo(page, 'alice');
      const out = await pages.alice.evaluate(() => window.kcs.stats.outbound('camera'));
      const sent = out.filter((o) => o.frameWidth > 0).map((o) => o.frameWidth).sort((a, b) => a - b);
      last = { received: v && `${v.frameWidth}x${v.frameHeight}`, sent: out.map((o) => `${o.rid}:${o.frameWidth}x${o.frameHeight}(${o.qualityLimitationReason})`) };
      return v && sent.length && pred(v, sent) ? { ...v, sent: last.sent } : null;
    }, { timeoutMs: LAYER_TIMEOUT_MS, intervalMs: 500 });
  } catch (err) {
    throw new Error(`${err.message}; last seen ${JSON.stringify(last)}`);
  }
}

async function main() {
  edge = await startEdge({ name: NAME });
  log(`edge at ${edge.url}, udp ${edge.udpPort}`);
  browser = await launchChromium();
  const tokens = { alice: edge.token(ROOM, 'alice'), bob: edge.token(ROOM, 'bob') };
  for (const who of ['alice', 'bob']) {
    pages[who] = await openRoomPage(browser, {
      base: edge.url, room: ROOM, token: tokens[who], label: who, query: { fps: FPS },
    });
  }
  await Promise.all(['alice', 'bob'].map((who) => waitJoined(pages[who], who)));
  log('both pages joined and published');

  await decodesGrowing(pages.alice, 'bob', 'alice');
  const seen = await decodesGrowing(pages.bob, 'alice', 'bob');
  await screenshot(pages.bob, `${NAME}-bob-decoding`);

  // Chromium starts the top encoding once its bandwidth estimate allows (seconds on loopback).
  let sending;
  await waitFor('alice sending three simulcast layers', async () => {
    const out = await pages.alice.evaluate(() => window.kcs.stats.outbound('camera'));
    sending = out.map((o) => `${o.rid}:${o.frameWidth}x${o.frameHeight}(${o.qualityLimitationReason})`);
    return out.filter((o) => o.frameWidth > 0).length === 3;
  }, { timeoutMs: LAYER_TIMEOUT_MS, intervalMs: 500 }).catch((err) => {
    throw new Error(`${err.message}; alice sends ${sending?.join(' ')}`);
  });
  log(`alice sends ${sending.join(' ')}`);

  await setQuality(pages.bob, seen.trackId, 'high');
  const high = await waitLayer(pages.bob, 'high', (v, sent) => v.frameWidth >= MIN_TOP_WIDTH && v.frameWidth === sent.at(-1));
  log(`bob at high: ${high.frameWidth}x${high.frameHeight}; alice sends ${high.sent.join(' ')}`);

  await setQuality(pages.bob, seen.trackId, 'low');
  const low = await waitLayer(pages.bob, 'low',
    (v, sent) => v.frameWidth > 0 && v.frameWidth <= MAX_LOW_WIDTH && v.frameWidth === sent[0] && v.frameWidth < high.frameWidth);
  log(`bob at low: ${low.frameWidth}x${low.frameHeight}; alice sends ${low.sent.join(' ')}`);
  await screenshot(pages.bob, `${NAME}-bob-low`);

  await setQuality(pages.bob, seen.trackId, 'high');
  const back = await waitLayer(pages.bob, 'high again', (v, sent) => v.frameWidth >= MIN_TOP_WIDTH && v.frameWidth === sent.at(-1));
  log(`bob back at high: ${back.frameWidth}x${back.frameHeight}; alice sends ${back.sent.join(' ')}`);
  await screenshot(pages.bob, `${NAME}-bob-high`);

  // Audio after video, and not fatal at once, so that one failure does not hide the others.
  const failures = [];
  for (const [page, from, label] of [[pages.alice, 'bob', 'alice'], [pages.bob, 'alice', 'bob']]) {
    await hearsGrowing(page, from, label).catch((err) => failures.push(err.message));
  }

  for (const who of ['alice', 'bob']) {
    const errors = await pageErrors(pages[who]);
    if (errors.length) failures.push(`${who}'s page shows errors: ${JSON.stringify(errors)}`);
  }

  // Alice leaves with the page's button: bob's tile of her goes away.
  await pages.alice.click('#leave');
  await waitFor("alice's tile leaving bob's page", async () =>
    (await pages.bob.locator(`figure[data-track="${seen.trackId}"]`).count()) === 0,
  { timeoutMs: 10_000 }).then(() => log("alice left: bob's tile of her is gone"), (err) => failures.push(err.message));

  if (failures.length) throw new Error(failures.join('; '));
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
    log(`${who} remote audio:`, JSON.stringify(await page.evaluate(() => window.kcs?.stats.remoteAudio()).catch((e) => e.message)));
    log(`${who} subscriber m-lines:`, JSON.stringify(await page.evaluate(() => window.kcs?.client.subPc?.getTransceivers().map((t) => `${t.mid}:${t.receiver.track.kind}:${t.currentDirection}`)).catch((e) => e.message)));
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
