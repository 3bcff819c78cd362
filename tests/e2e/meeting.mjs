// Real-browser test of the meeting page (`/`) on a real `kcs dev` edge, three headless Chromium
// pages driven like people would, by clicking the page's buttons:
//
//  1. alice (host) joins with video from the prejoin lobby and turns the waiting room on (every
//     control of the page has an accessible name);
//  2. bob (presenter) and carol (attendee) join with video and wait; alice admits both from the
//     People panel;
//  3. everyone decodes everyone else's camera (inbound-rtp framesDecoded grows);
//  4. bob shares his screen (Chromium's fake screen capture): alice and carol get it on the
//     large stage, named "bob is presenting", decoding frames, larger than the grid tiles; the
//     camera tiles, now small, ask for the lowest simulcast layer and get it;
//  5. all three send a chat message at once: the three chat logs show the same messages in the
//     same order;
//  6. carol raises her hand with the keyboard (Alt+H): alice sees the badge on carol's tile and
//     in the People list; carol's reaction shows on alice's page;
//  7. carol tries to mute alice through the client library (the page offers her no such
//     control): refused with `forbidden`, and alice's audio keeps arriving at bob;
//  8. alice mutes bob from the People list: bob's audio bytes stop growing at alice and carol
//     (they were growing before), and bob's page says he was muted;
//  9. alice removes carol: carol's page says she was removed, and her tile leaves the others';
// 10. bob turns his camera off with Alt+V: alice's tile of him shows his initials; alice's
//     meeting timer runs.
//
// A screenshot of each step goes to artifacts/meeting-<step>-<who>.png.
// Run: node tests/e2e/meeting.mjs (after scripts/install-test-deps.sh and a build of kcs).
import { startEdge, waitFor, sleep } from '../lib/edge.mjs';
import { launchChromium, openRoomPage, screenshot } from '../lib/browser.mjs';

const NAME = 'meeting';
const ROOM = `meeting-${process.pid}`;
/** 10 fps: a third of the default 30's encoding work, for three cameras and a screen on two cores. */
const FPS = '10';
/** Chromium's screen picker: the fake capture device answers without a prompt. */
const SCREEN_ARGS = ['--auto-select-desktop-capture-source=Entire screen', '--enable-usermedia-screen-capturing'];
const PEOPLE = { alice: 'host', bob: 'presenter', carol: 'attendee' };

let edge;
let browser;
/** @type {Record<string, import('playwright-core').Page>} */
const pages = {};
const t0 = Date.now();
const log = (...a) => console.log(`[${NAME} ${((Date.now() - t0) / 1000).toFixed(1)}s]`, ...a);
let step = 0;

/** Screenshots of every page for a step. */
async function shots(label, who = Object.keys(pages)) {
  step += 1;
  for (const w of who) await screenshot(pages[w], `${NAME}-${String(step).padStart(2, '0')}-${label}-${w}`);
}

/** The participant id of `identity` as `page` knows it. */
function idOn(page, identity) {
  return page.evaluate((ident) => {
    for (const p of window.meet.client.participants.values()) if (p.identity === ident) return p.id;
    return null;
  }, identity);
}

/** Inbound stats of what `page` receives from `identity`'s `source`, or null. */
async function inbound(page, identity, source) {
  const all = await page.evaluate(() => window.meet.stats.remote());
  return all.find((s) => s.identity === identity && s.source === source) ?? null;
}

/**
 * `label` decodes `from`'s `source`: framesDecoded > 0, and growing after that. (A layer switch
 * waits for a keyframe, which can take a few seconds on a loaded machine, so growth is polled.)
 */
async function decodes(page, label, from, source = 'camera') {
  const first = await waitFor(`${label} decoding ${from}'s ${source}`, async () => {
    const v = await inbound(page, from, source);
    return v && v.framesDecoded > 0 ? v : null;
  }, { timeoutMs: 30_000 });
  const second = await waitFor(`${label}'s frames of ${from}'s ${source} growing past ${first.framesDecoded}`, async () => {
    const v = await inbound(page, from, source);
    return v && v.framesDecoded > first.framesDecoded ? v : null;
  }, { timeoutMs: 10_000 });
  log(`${label} decodes ${from}'s ${source}: ${second.frameWidth}x${second.frameHeight}, frames ${first.framesDecoded} -> ${second.framesDecoded}`);
}

/** Bytes of `from`'s microphone received by `page` now (0 when none). */
async function audioBytes(page, from) {
  return (await inbound(page, from, 'microphone'))?.bytesReceived ?? 0;
}

/** `label` receives `from`'s microphone: its bytes grow. */
async function audioGrows(page, label, from) {
  const before = await waitFor(`${label} receiving ${from}'s audio`, async () => {
    const b = await audioBytes(page, from);
    return b > 0 ? b : null;
  }, { timeoutMs: 20_000 });
  await sleep(1500);
  const after = await audioBytes(page, from);
  if (after <= before) throw new Error(`${label}: ${from}'s audio bytes did not grow (${before} -> ${after})`);
  return after - before;
}

/** Opens the meeting page for `who` and joins with video from the prejoin lobby. */
async function openAndJoin(who) {
  const page = await openRoomPage(browser, {
    base: edge.url, room: ROOM, token: edge.token(ROOM, who, PEOPLE[who]), label: who, path: '/',
    query: { name: who, fps: FPS },
  });
  pages[who] = page;
  await page.getByRole('button', { name: 'Join with video' }).waitFor();
  // The preview must be live before joining (it becomes the published camera).
  await page.waitForFunction(() => {
    const v = document.getElementById('preview');
    return v && v.srcObject && v.videoWidth > 0;
  }, null, { timeout: 15_000 });
  await page.getByRole('button', { name: 'Join with video' }).click();
}

/** Waits until `who`'s page is in the meeting with its camera and microphone published. */
async function inMeeting(who) {
  const page = pages[who];
  await page.locator('#meeting').waitFor({ state: 'visible', timeout: 30_000 });
  await waitFor(`${who} publishing`, () => page.evaluate(() => {
    const pubs = window.meet.client.publications;
    return pubs.get('camera')?.trackId != null && pubs.get('microphone')?.trackId != null;
  }), { timeoutMs: 20_000 });
}

async function main() {
  edge = await startEdge({ name: NAME });
  log(`edge at ${edge.url}`);
  browser = await launchChromium({ args: SCREEN_ARGS });

  // 1. The host joins and turns the waiting room on.
  await openAndJoin('alice');
  await inMeeting('alice');
  const alice = pages.alice;
  await alice.getByRole('button', { name: 'People' }).click();
  await alice.getByLabel('Waiting room', { exact: true }).check();
  await waitFor('the waiting room on', () => alice.evaluate(() => window.meet.client.settings.lobby === true));
  // Every control has a name a screen reader can say.
  const unnamed = await alice.evaluate(() => [...document.querySelectorAll('#meeting button, #meeting select, #meeting input')]
    .filter((el) => el.checkVisibility())
    .filter((el) => !(el.getAttribute('aria-label') || el.labels?.length || (el.tagName === 'BUTTON' && el.textContent.trim())))
    .map((el) => el.outerHTML.slice(0, 80)));
  if (unnamed.length) throw new Error(`controls without an accessible name: ${JSON.stringify(unnamed)}`);
  await shots('host-joined', ['alice']);

  // 2. Two guests wait; the host admits them.
  await openAndJoin('bob');
  await openAndJoin('carol');
  for (const who of ['bob', 'carol']) {
    await pages[who].locator('#waiting').waitFor({ state: 'visible', timeout: 20_000 });
  }
  await alice.locator('#lobby-list li').nth(1).waitFor({ timeout: 20_000 });
  await shots('lobby');
  for (const who of ['bob', 'carol']) {
    await alice.getByRole('button', { name: `Admit ${who}` }).click();
  }
  await Promise.all(['bob', 'carol'].map(inMeeting));
  log('alice admitted bob and carol');

  // 3. Everyone sees everyone.
  for (const [who, others] of [['alice', ['bob', 'carol']], ['bob', ['alice', 'carol']], ['carol', ['alice', 'bob']]]) {
    for (const other of others) await decodes(pages[who], who, other);
  }
  for (const who of Object.keys(PEOPLE)) {
    const visible = await pages[who].locator('#grid figure.tile:not(.local) video:not([hidden])').count();
    if (visible !== 2) throw new Error(`${who}'s grid shows ${visible} remote videos, not 2`);
  }
  await shots('all-video');

  // 4. Bob shares his screen; the others see it large, with his name.
  await pages.bob.getByRole('button', { name: 'Share screen' }).click();
  for (const who of ['alice', 'carol']) {
    const page = pages[who];
    await page.locator('#stage[data-kind="screen"] figure.screen').waitFor({ timeout: 20_000 });
    const caption = await page.locator('#stage .presenter').textContent();
    if (caption !== 'bob is presenting') throw new Error(`${who}'s stage caption is "${caption}"`);
    await decodes(page, who, 'bob', 'screen');
    const stageBox = await page.locator('#stage figure.screen').boundingBox();
    const tileBox = await page.locator('#grid figure.tile').first().boundingBox();
    if (!stageBox || !tileBox || stageBox.width * stageBox.height < 4 * tileBox.width * tileBox.height) {
      throw new Error(`${who}: the shared screen is not large (${JSON.stringify(stageBox)} vs tile ${JSON.stringify(tileBox)})`);
    }
  }
  // The camera tiles are now a strip of small tiles under the stage: each asks for the lowest
  // simulcast layer (its height is under 180 px), so alice decodes bob's camera at bob's lowest
  // encoding (1280 / 4 = 320 wide, or less when Chromium scaled bob down for CPU).
  const small = await waitFor("alice receiving bob's camera at the lowest layer", async () => {
    const v = await inbound(alice, 'bob', 'camera');
    return v && v.frameWidth > 0 && v.frameWidth <= 320 ? v : null;
  }, { timeoutMs: 20_000 });
  log(`alice's strip tile of bob decodes ${small.frameWidth}x${small.frameHeight}`);
  await shots('screen-share');

  // 5. Chat from all three at once arrives everywhere in one order.
  for (const who of Object.keys(PEOPLE)) await pages[who].getByRole('button', { name: /^Chat/ }).click();
  await Promise.all(Object.keys(PEOPLE).map(async (who) => {
    await pages[who].locator('#chat-input').fill(`hello from ${who}`);
    await pages[who].locator('#chat-input').press('Enter');
  }));
  const logs = {};
  for (const who of Object.keys(PEOPLE)) {
    logs[who] = await waitFor(`${who}'s chat log of 3`, async () => {
      const texts = await pages[who].locator('#chat-log li .text').allTextContents();
      return texts.length >= 3 ? texts : null;
    }, { timeoutMs: 10_000 });
  }
  if (new Set(Object.values(logs).map((l) => JSON.stringify(l))).size !== 1) {
    throw new Error(`chat orders differ: ${JSON.stringify(logs)}`);
  }
  if (new Set(logs.alice).size !== 3) throw new Error(`chat log is not the three messages: ${JSON.stringify(logs.alice)}`);
  log(`chat order everywhere: ${JSON.stringify(logs.alice)}`);
  await shots('chat');

  // 6. Carol raises her hand from the keyboard (Alt+H); alice sees it. Carol reacts; alice sees it.
  await pages.carol.locator('body').press('Alt+KeyH');
  const carolId = await idOn(alice, 'carol');
  await alice.locator(`#grid figure[data-participant="${carolId}"] .badge-hand:not([hidden])`).waitFor({ timeout: 10_000 });
  await alice.locator(`#people-list li[data-participant="${carolId}"] [aria-label="hand raised"]`).waitFor({ timeout: 5_000 });
  log('alice sees carol\'s hand');
  await pages.carol.getByRole('button', { name: 'React thumbs up' }).click();
  await alice.locator('#reaction-layer span', { hasText: 'carol' }).waitFor({ timeout: 5_000 });
  await shots('hand', ['alice']);

  // 7. Carol may not mute the host.
  const aliceIdAtCarol = await idOn(pages.carol, 'alice');
  const refusal = await pages.carol.evaluate((id) => window.meet.client.muteRemote(id)
    .then(() => 'acked', (err) => err.code), aliceIdAtCarol);
  if (refusal !== 'forbidden') throw new Error(`carol muting alice got ${refusal}, not forbidden`);
  await audioGrows(pages.bob, 'bob', 'alice');
  log('carol muting alice: forbidden; alice is still heard');

  // 8. Alice mutes bob: his audio stops arriving.
  for (const who of ['alice', 'carol']) log(`${who} receives bob's audio: +${await audioGrows(pages[who], who, 'bob')} bytes in 1.5 s`);
  await alice.getByRole('button', { name: 'Mute bob' }).click();
  await pages.bob.getByRole('button', { name: 'Unmute' }).waitFor({ timeout: 10_000 });
  await sleep(1000); // packets already in flight
  const before = { alice: await audioBytes(alice, 'bob'), carol: await audioBytes(pages.carol, 'bob') };
  await sleep(3000);
  for (const who of ['alice', 'carol']) {
    const after = await audioBytes(pages[who], 'bob');
    if (after !== before[who]) throw new Error(`${who} still receives bob's audio after the mute (${before[who]} -> ${after})`);
  }
  log('alice muted bob: no audio bytes of his arrive at alice or carol for 3 s');
  const bobMutedBadge = alice.locator(`#grid figure[data-participant="${await idOn(alice, 'bob')}"] .badge-muted:not([hidden])`);
  await bobMutedBadge.waitFor({ timeout: 5_000 });
  await shots('muted', ['alice', 'bob']);

  // 9. Alice removes carol.
  await alice.getByRole('button', { name: 'Remove carol from the meeting' }).click();
  await pages.carol.locator('#ended').waitFor({ state: 'visible', timeout: 10_000 });
  const reason = await pages.carol.locator('#ended-reason').textContent();
  if (!/removed/.test(reason ?? '')) throw new Error(`carol's page says "${reason}"`);
  for (const who of ['alice', 'bob']) {
    await waitFor(`carol's tile leaving ${who}'s page`, async () =>
      (await pages[who].locator(`#grid figure[data-participant="${await idOn(pages[who], 'carol') ?? carolId}"]`).count()) === 0
      && (await idOn(pages[who], 'carol')) === null, { timeoutMs: 10_000 });
  }
  log('alice removed carol');
  await shots('removed');
  // 10. Bob turns his camera off from the keyboard (Alt+V): alice's tile of him shows his
  // initials instead of video.
  await pages.bob.locator('body').press('Alt+KeyV');
  const bobTile = alice.locator(`#grid figure[data-participant="${await idOn(alice, 'bob')}"]`);
  await bobTile.locator('video[hidden]').waitFor({ state: 'attached', timeout: 10_000 });
  const avatar = await bobTile.locator('.avatar:not([hidden])').textContent({ timeout: 5_000 });
  if (avatar !== 'BO') throw new Error(`alice's tile of bob without video shows "${avatar}"`);
  log('bob turned his camera off: alice sees his initials');
  await shots('camera-off', ['alice', 'bob']);

  const timer = await alice.locator('#timer').textContent();
  if (!/^[1-9]\d*:\d\d$|^0:[0-5]\d$/.test(timer ?? '') || timer === '0:00') throw new Error(`alice's meeting timer shows "${timer}"`);

  const pageErrors = {};
  for (const [who, page] of Object.entries(pages)) {
    const errs = await page.evaluate(() => window.meet.errors.filter((e) => !e.startsWith('refused:')));
    if (errs.length) pageErrors[who] = errs;
  }
  if (Object.keys(pageErrors).length) throw new Error(`pages show errors: ${JSON.stringify(pageErrors)}`);
}

let failed = null;
const hardTimeout = setTimeout(() => {
  console.log(`FAIL ${NAME}: hard timeout`);
  process.exit(1);
}, 230_000);
const started = Date.now();
try {
  await main();
} catch (err) {
  failed = err;
  for (const [who, page] of Object.entries(pages)) {
    await screenshot(page, `${NAME}-failure-${who}`);
    log(`${who} errors:`, JSON.stringify(await page.evaluate(() => window.meet?.errors).catch((e) => e.message)));
  }
  if (edge) log(`edge log tail:\n${edge.tail()}`);
} finally {
  await browser?.close().catch(() => {});
  await edge?.stop();
  clearTimeout(hardTimeout);
}
log(`took ${((Date.now() - started) / 1000).toFixed(1)} s`);
if (failed) {
  console.log(`FAIL ${NAME}: ${failed.stack ?? failed.message}`);
  process.exit(1);
}
console.log(`PASS ${NAME}`);
