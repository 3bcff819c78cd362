// Test harness for Node tests: start a real `kcs dev` edge on free ports, mint tokens with
// `kcs token`, and always stop it (also when the test fails or is interrupted).
//
// With KCS_MOCK_EDGE=1 it starts tests/lib/mock_edge.py instead (an aiortc stand-in for checking
// the tests' own plumbing while the edge is being written; it proves nothing about the edge).
//
// The binary is $KCS_BIN (scripts/test.sh sets it to the one it built), else the newer of
// <target>/debug/kcs and <target>/release/kcs, <target> being $CARGO_TARGET_DIR or <repo>/target.
// Its output goes to artifacts/<name>-edge.log.
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, mkdirSync, openSync, readFileSync, rmSync, existsSync, statSync } from 'node:fs';
import { createServer } from 'node:net';
import { createSocket } from 'node:dgram';
import { tmpdir } from 'node:os';
import { join, dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const ARTIFACTS = join(REPO, 'artifacts');

/** How long an edge may take to answer /healthz: the binary starts in well under 1 s. */
const READY_TIMEOUT_MS = 15_000;

/** @returns {string} path of the kcs binary */
export function kcsBin() {
  if (process.env.KCS_BIN) return process.env.KCS_BIN;
  const target = process.env.CARGO_TARGET_DIR || join(REPO, 'target');
  const built = ['debug', 'release']
    .map((profile) => join(target, profile, 'kcs'))
    .filter((path) => existsSync(path))
    .sort((a, b) => statSync(b).mtimeMs - statSync(a).mtimeMs);
  return built[0] ?? join(target, 'debug', 'kcs');
}

/** @param {string} host @returns {Promise<number>} a TCP port free right now on host */
export function freeTcpPort(host = '127.0.0.1') {
  return new Promise((ok, fail) => {
    const srv = createServer();
    srv.once('error', fail);
    srv.listen(0, host, () => {
      const { port } = /** @type {import('node:net').AddressInfo} */ (srv.address());
      srv.close(() => ok(port));
    });
  });
}

/** @param {string} host @returns {Promise<number>} a UDP port free right now on host */
export function freeUdpPort(host = '127.0.0.1') {
  return new Promise((ok, fail) => {
    const sock = createSocket('udp4');
    sock.once('error', fail);
    sock.bind(0, host, () => {
      const { port } = sock.address();
      sock.close(() => ok(port));
    });
  });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `fn` until it returns a truthy value or `timeoutMs` passes (then throws `what`). */
export async function waitFor(what, fn, { timeoutMs = 20_000, intervalMs = 250 } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) {
      const detail = last instanceof Error ? last.message : JSON.stringify(last);
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (last: ${detail})`);
    }
    await sleep(intervalMs);
  }
}

/** Edges started by this process, stopped at exit whatever happens. */
const running = new Set();
process.on('exit', () => {
  for (const child of running) child.kill('SIGKILL');
});
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => process.exit(130));
}

/**
 * Starts `kcs dev` and waits until GET /healthz answers 200.
 * @param {object} opts
 * @param {string} opts.name log name (artifacts/<name>-edge.log)
 * @param {string} [opts.httpHost] address the HTTP/WebSocket listener binds (default 127.0.0.1)
 * @param {string} [opts.udpHost] address the media UDP port binds (default 0.0.0.0)
 * @param {string[]} [opts.extraArgs]
 */
export async function startEdge({ name, httpHost = '127.0.0.1', udpHost = '0.0.0.0', extraArgs = [] }) {
  const mock = process.env.KCS_MOCK_EDGE === '1';
  const bin = kcsBin();
  if (!mock && !existsSync(bin)) throw new Error(`${bin} not found: build it with cargo build -p edge-node --bin kcs`);
  mkdirSync(ARTIFACTS, { recursive: true });
  const dataDir = mkdtempSync(join(tmpdir(), `kcs-${name}-`));
  const httpPort = await freeTcpPort(httpHost);
  const udpPort = await freeUdpPort(udpHost === '0.0.0.0' ? '127.0.0.1' : udpHost);
  const logPath = join(ARTIFACTS, `${name}-edge.log`);
  const log = openSync(logPath, 'w');
  const args = ['dev', '--http', `${httpHost}:${httpPort}`, '--udp', `${udpHost}:${udpPort}`,
    '--data-dir', dataDir, ...extraArgs];
  const [exe, argv] = mock
    ? ['python3', [join(REPO, 'tests', 'lib', 'mock_edge.py'), '--http', `${httpHost}:${httpPort}`]]
    : [bin, args];
  const child = spawn(exe, argv, {
    stdio: ['ignore', log, log],
    env: { RUST_LOG: 'info', ...process.env },
  });
  running.add(child);
  let exited = null;
  child.on('exit', (code, signal) => {
    exited = { code, signal };
    running.delete(child);
  });
  const url = `http://${httpHost}:${httpPort}`;
  const edge = {
    url, httpPort, udpPort, dataDir, logPath, child,
    /** Mints a token with `kcs token` (same data dir, so the same dev key). */
    token(room, identity, role = 'host') {
      if (mock) return `mock:${room}:${identity}`;
      return execFileSync(bin, ['token', '--room', room, '--identity', identity, '--role', role,
        '--data-dir', dataDir], { encoding: 'utf8' }).trim();
    },
    /** The last lines of the edge's log, for failure reports. */
    tail(lines = 40) {
      try {
        return readFileSync(logPath, 'utf8').split('\n').slice(-lines).join('\n');
      } catch {
        return '';
      }
    },
    async stop() {
      if (exited === null) {
        child.kill('SIGTERM');
        const deadline = Date.now() + 3000;
        while (exited === null && Date.now() < deadline) await sleep(50);
        if (exited === null) child.kill('SIGKILL');
      }
      running.delete(child);
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
  try {
    await waitFor(`${url}/healthz`, async () => {
      if (exited) throw new Error(`kcs exited early (${JSON.stringify(exited)}):\n${edge.tail()}`);
      const res = await fetch(`${url}/healthz`).catch(() => null);
      return res?.status === 200;
    }, { timeoutMs: READY_TIMEOUT_MS, intervalMs: 100 });
  } catch (err) {
    await edge.stop();
    throw err;
  }
  return edge;
}
