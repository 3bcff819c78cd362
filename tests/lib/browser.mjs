// Launching Debian's Chromium for tests with the flags that work on this machine
// (shared/guides/testing.md): headless, no sandbox (root), fake camera and microphone, loopback
// ICE candidates allowed. playwright-core drives it over a pipe and never downloads a browser.
import { createRequire } from 'node:module';
import { mkdirSync } from 'node:fs';
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
    args: [...CHROMIUM_ARGS, ...(opts.args ?? [])],
    timeout: 30_000,
  });
}

/**
 * Opens the edge's page for a room in a new browser context (its own cookies and devices).
 * Console errors of the page are echoed with a prefix.
 */
export async function openRoomPage(browser, { base, room, token, label, query = {} }) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  page.on('console', (msg) => {
    if (msg.type() === 'error' || msg.type() === 'warning') {
      console.log(`[${label} console.${msg.type()}] ${msg.text()}`);
    }
  });
  page.on('pageerror', (err) => console.log(`[${label} pageerror] ${err.message}`));
  const qs = new URLSearchParams({ room, ...(token ? { token } : {}), ...query });
  await page.goto(`${base}/?${qs}`);
  return page;
}

/** Saves a screenshot to artifacts/<name>.png (failures to do so are only logged). */
export async function screenshot(page, name) {
  mkdirSync(ARTIFACTS, { recursive: true });
  const path = join(ARTIFACTS, `${name}.png`);
  await page.screenshot({ path }).catch((err) => console.log(`screenshot ${name}: ${err.message}`));
  return path;
}
