// Launching Debian's Chromium for tests with the flags that work on this machine
// (shared/guides/testing.md): headless, no sandbox (root), fake camera and microphone, loopback
// ICE candidates allowed. playwright-core drives it over a pipe and never downloads a browser.
import { createRequire } from 'node:module';
import { mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { ARTIFACTS, REPO } from './edge.mjs';

// playwright-core is installed in tests/e2e/node_modules (package-lock.json there), which an
// import from tests/lib/ would not find: resolve it from tests/e2e.
const require = createRequire(join(REPO, 'tests', 'e2e', 'package.json'));
/** @type {typeof import('playwright-core').chromium} */
const chromium = require('playwright-core').chromium;

export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

export const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--use-fake-ui-for-media-stream',
  '--use-fake-device-for-media-stream',
  '--allow-loopback-in-peer-connection',
  '--autoplay-policy=no-user-gesture-required',
  // Headless tabs in the background must not throttle their timers or WebRTC.
  '--disable-background-timer-throttling',
  '--disable-renderer-backgrounding',
  '--disable-backgrounding-occluded-windows',
];

/**
 * @param {{executablePath?: string, args?: string[]}} [opts]
 * @returns {Promise<import('playwright-core').Browser>}
 */
export function launchChromium(opts = {}) {
  return chromium.launch({
    executablePath: opts.executablePath ?? CHROMIUM,
    headless: true,
    // Pages served from disk (KCS_WEB_DIR) have no address, and Chromium then blocks their
    // socket to the loopback edge as a public page reaching a local one.
    args: [...CHROMIUM_ARGS, ...(process.env.KCS_WEB_DIR ? ['--disable-features=LocalNetworkAccessChecks'] : []),
      ...(opts.args ?? [])],
    timeout: 30_000,
  });
}

/**
 * Opens an edge's page for a room in a new browser context (its own cookies and devices): the
 * basic page (`/basic`, joins at once) unless `path` says otherwise (`/` is the meeting page).
 * Console errors of the page are echoed with a prefix.
 */
export async function openRoomPage(browser, { base, room, token, label, query = {}, path = '/basic', contextOptions = {} }) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, ...contextOptions });
  if (process.env.KCS_WEB_DIR) await serveWebFromDisk(context, process.env.KCS_WEB_DIR);
  const page = await context.newPage();
  page.on('console', (msg) => {
    if (msg.type() === 'error' || msg.type() === 'warning') {
      console.log(`[${label} console.${msg.type()}] ${msg.text()}`);
    }
  });
  page.on('pageerror', (err) => console.log(`[${label} pageerror] ${err.message}`));
  const qs = new URLSearchParams({ room, ...(token ? { token } : {}), ...query });
  await page.goto(`${base}${path}?${qs}`);
  return page;
}

/**
 * For working on the page: the browser gets the web files from `dir` (edge-node/web) instead of
 * the copies built into the edge, so a change needs no rebuild of kcs. Test runs that count
 * never set KCS_WEB_DIR: they test what the edge serves.
 */
async function serveWebFromDisk(context, dir) {
  const types = { '.js': 'text/javascript', '.css': 'text/css', '.html': 'text/html' };
  const files = { '/': 'index.html', '/basic': 'basic.html' };
  await context.route((url) => url.pathname in files || /^\/[\w.-]+\.(js|css)$/.test(url.pathname), (route) => {
    const { pathname } = new URL(route.request().url());
    const name = files[pathname] ?? pathname.slice(1);
    const body = readFileSync(join(dir, name), 'utf8');
    return route.fulfill({ body, contentType: types[name.slice(name.lastIndexOf('.'))] });
  });
}

/** Saves a screenshot to artifacts/<name>.png (failures to do so are only logged). */
export async function screenshot(page, name) {
  mkdirSync(ARTIFACTS, { recursive: true });
  const path = join(ARTIFACTS, `${name}.png`);
  await page.screenshot({ path }).catch((err) => console.log(`screenshot ${name}: ${err.message}`));
  return path;
}

/**
 * Waits until the page has joined and published (window.kcs.ready), or throws with the page's
 * visible errors.
 */
export async function waitJoined(page, label, timeoutMs = 30_000) {
  const result = await page
    .waitForFunction(() => window.kcs !== undefined, null, { timeout: timeoutMs })
    .then(() =>
      page.evaluate(
        (ms) =>
          Promise.race([
            window.kcs.ready.then(() => ({ ok: true }), (e) => ({ ok: false, error: String(e?.message ?? e) })),
            new Promise((r) => setTimeout(() => r({ ok: false, error: `not joined within ${ms} ms` }), ms)),
          ]),
        timeoutMs,
      ),
    );
  if (!result.ok) {
    const errors = await page.evaluate(() => window.kcs?.errors ?? []).catch(() => []);
    throw new Error(`${label} did not join: ${result.error}; page errors: ${JSON.stringify(errors)}`);
  }
}

/**
 * Inbound stats of the video this page receives from `identity`'s `source` (default camera),
 * or null when it receives none.
 */
export async function remoteVideo(page, identity, source = 'camera') {
  const all = await page.evaluate(() => window.kcs.stats.remoteVideo());
  return all.find((v) => v.identity === identity && v.source === source) ?? null;
}

/** Inbound stats of the audio this page receives from `identity`'s microphone, or null. */
export async function remoteAudio(page, identity, source = 'microphone') {
  const all = await page.evaluate(() => window.kcs.stats.remoteAudio());
  return all.find((a) => a.identity === identity && a.source === source) ?? null;
}

/** Page errors shown to the user (window.kcs.errors). */
export function pageErrors(page) {
  return page.evaluate(() => window.kcs?.errors ?? []).catch((err) => [`(page gone: ${err.message})`]);
}
