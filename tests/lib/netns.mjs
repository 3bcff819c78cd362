// A network namespace joined to the root namespace by a veth pair, for tests that put a client
// behind a link of its own (rate caps with tc tbf, loss with nftables). Needs root.
//
// Addresses come from 198.51.100.0/24 (TEST-NET-2, RFC 5737), one /30 per namespace picked from
// the process id so that parallel runs do not collide. remove() deletes the namespace (and with
// it both veth ends) and is safe to call twice.
import { execFileSync } from 'node:child_process';
import { writeFileSync, rmSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** @param {string[]} args */
function ip(...args) {
  execFileSync('ip', args, { stdio: ['ignore', 'pipe', 'pipe'] });
}

/** @param {string} cmd @param {string[]} args @param {string} [input] stdin */
function run(cmd, args, input) {
  return execFileSync(cmd, args, { encoding: 'utf8', input, stdio: ['pipe', 'pipe', 'pipe'] });
}

/** Whether this process may create namespaces (root with iproute2). */
export function canUseNetns() {
  if (process.getuid?.() !== 0) return false;
  try {
    run('ip', ['netns', 'list']);
    return true;
  } catch {
    return false;
  }
}

/**
 * Creates namespace `kcs<tag>` with veth `kcs<tag>r` (root side) and `kcs<tag>n` (inside).
 * @param {string} tag short tag (interface names have at most 15 characters)
 */
export function createNetns(tag = String(process.pid % 100000)) {
  const name = `kcs${tag}`;
  const rootIf = `${name}r`;
  const nsIf = `${name}n`;
  const block = 4 * (1 + (process.pid % 62)); // a /30 inside 198.51.100.0/24, never .0 or .255
  const rootAddr = `198.51.100.${block + 1}`;
  const nsAddr = `198.51.100.${block + 2}`;
  const ns = {
    name, rootIf, nsIf, rootAddr, nsAddr,
    removed: false,
    /** Caps the root side's egress (traffic towards the namespace) with a token bucket. */
    capEgress(rate = '700kbit', burst = '16kb', latency = '200ms') {
      run('tc', ['qdisc', 'replace', 'dev', rootIf, 'root', 'tbf', 'rate', rate, 'burst', burst, 'latency', latency]);
    },
    uncapEgress() {
      try {
        run('tc', ['qdisc', 'del', 'dev', rootIf, 'root']);
      } catch {
        // no qdisc installed: nothing to remove
      }
    },
    /** tc statistics of the root side's qdisc (drops show the cap at work). */
    qdiscStats() {
      try {
        return run('tc', ['-s', 'qdisc', 'show', 'dev', rootIf]).trim();
      } catch (err) {
        return String(err.message);
      }
    },
    /**
     * Writes an executable that runs `binary` inside the namespace with its arguments, for tools
     * that take an executable path (playwright's executablePath).
     */
    wrapper(binary) {
      const dir = mkdtempSync(join(tmpdir(), `${name}-`));
      const path = join(dir, 'run-in-netns');
      writeFileSync(path, `#!/bin/sh\nexec ip netns exec ${name} ${binary} "$@"\n`, { mode: 0o755 });
      ns._wrapperDirs.push(dir);
      return path;
    },
    _wrapperDirs: [],
    remove() {
      if (ns.removed) return;
      ns.removed = true;
      try {
        ip('netns', 'del', name);
      } catch {
        // already gone
      }
      try {
        ip('link', 'del', rootIf);
      } catch {
        // deleting the namespace deleted the pair
      }
      for (const dir of ns._wrapperDirs) rmSync(dir, { recursive: true, force: true });
    },
  };
  process.on('exit', () => ns.remove());
  // A leftover of a killed earlier run with the same pid would make `add` fail.
  ns.remove();
  ns.removed = false;
  try {
    ip('netns', 'add', name);
    ip('link', 'add', rootIf, 'type', 'veth', 'peer', 'name', nsIf);
    ip('link', 'set', nsIf, 'netns', name);
    ip('addr', 'add', `${rootAddr}/30`, 'dev', rootIf);
    ip('link', 'set', rootIf, 'up');
    ip('netns', 'exec', name, 'ip', 'link', 'set', 'lo', 'up');
    ip('netns', 'exec', name, 'ip', 'addr', 'add', `${nsAddr}/30`, 'dev', nsIf);
    ip('netns', 'exec', name, 'ip', 'link', 'set', nsIf, 'up');
    // Without a default route Chromium sees itself offline and gathers no ICE candidates at all.
    // The route only points at the root side of the veth, and a table inside the namespace
    // drops whatever would leave for anywhere else, so nothing escapes the test's own link.
    ip('netns', 'exec', name, 'ip', 'route', 'add', 'default', 'via', rootAddr);
    run('ip', ['netns', 'exec', name, 'nft', '-f', '-'], `table inet kcs_test {
  chain out {
    type filter hook output priority 0; policy accept;
    oifname "lo" accept
    ip daddr ${rootAddr}/30 accept
    drop
  }
}
`);
  } catch (err) {
    ns.remove();
    throw new Error(`cannot create namespace ${name}: ${err.stderr?.toString() || err.message}`);
  }
  return ns;
}
