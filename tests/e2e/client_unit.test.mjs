// Unit tests of edge-node/web/kcs-client.js in Node, with a scripted fake WebSocket (no browser,
// no edge): request/ack correlation, error codes, timeouts, socket close, the room model, seq
// gaps, the mid -> track bindings of the subscriber PC, and the tile-size layer rule.
//
// Run: node --test tests/e2e/client_unit.test.mjs
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { KcsClient, KcsError, maxSpatialForHeight, idOf } from '../../edge-node/web/kcs-client.js';

/** A WebSocket the test drives: it records what the client sends and delivers what we say. */
class FakeSocket {
  static OPEN = 1;
  static last = null;
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    FakeSocket.last = this;
    queueMicrotask(() => {
      this.readyState = 1;
      this.onopen?.();
    });
  }
  send(data) {
    this.sent.push(JSON.parse(data));
  }
  close(code = 1000, reason = '') {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
  /** Delivers a server message. */
  deliver(msg) {
    this.onmessage?.({ data: JSON.stringify(msg) });
  }
  /** Waits until the client has sent `n` messages. */
  async waitSent(n) {
    for (let i = 0; i < 100 && this.sent.length < n; i++) await new Promise((r) => setTimeout(r, 1));
    assert.ok(this.sent.length >= n, `expected ${n} sent messages, got ${this.sent.length}`);
    return this.sent[n - 1];
  }
}
globalThis.WebSocket = FakeSocket;

/** A connected client: hello and join acked; returns [client, socket]. */
async function joined(joinAck = {}) {
  const client = new KcsClient();
  const done = client.connect({ url: 'ws://edge.test/ws', token: 'tok', timeoutMs: 200 });
  await new Promise((r) => setTimeout(r, 0));
  const ws = FakeSocket.last;
  const hello = await ws.waitSent(1);
  assert.equal(hello.type, 'hello');
  assert.equal(hello.version, 1);
  ws.deliver({ type: 'ack', id: hello.id, version: 1, server: 'fake' });
  const join = await ws.waitSent(2);
  assert.equal(join.type, 'room:join');
  assert.equal(join.token, 'tok');
  assert.equal(join.autoSubscribe, true);
  ws.deliver({
    type: 'ack', id: join.id, room: 'r', you: { id: 1, identity: 'me', role: 'host' },
    participants: [{ id: 2, identity: 'bob', role: 'host' }],
    tracks: [{ id: 10, participant: 2, source: 'camera', kind: 'video', layers: 3 }],
    seq: 5, ...joinAck,
  });
  await done;
  return [client, ws];
}

test('join fills the room model from the ack', async () => {
  const [client] = await joined();
  assert.equal(client.room, 'r');
  assert.equal(client.you.identity, 'me');
  assert.deepEqual([...client.participants.keys()].sort(), [1, 2]);
  assert.equal(client.tracks.get(10).source, 'camera');
  assert.equal(client.seq, 5);
});

test('every request gets its own reply by id, in any order', async () => {
  const [client, ws] = await joined();
  const a = client.setLayers(10, 0);
  const b = client.pause(10);
  const [ra, rb] = [await ws.waitSent(3), await ws.waitSent(4)];
  assert.deepEqual([ra.type, ra.track, ra.maxSpatial], ['consumer:layers', 10, 0]);
  assert.equal(rb.type, 'consumer:pause');
  assert.notEqual(ra.id, rb.id);
  ws.deliver({ type: 'ack', id: rb.id, x: 2 });
  ws.deliver({ type: 'ack', id: ra.id, x: 1 });
  assert.deepEqual(await a, { x: 1 });
  assert.deepEqual(await b, { x: 2 });
});

test('an error reply rejects with its code', async () => {
  const [client, ws] = await joined();
  const p = client.consume([99]);
  const req = await ws.waitSent(3);
  ws.deliver({ type: 'error', id: req.id, code: 'no_such_track', message: 'no track 99' });
  await assert.rejects(p, (err) => err instanceof KcsError && err.code === 'no_such_track'
    && err.requestType === 'consume' && /no track 99/.test(err.message));
});

test('no reply rejects with timeout, and a late reply is ignored', async () => {
  const [client, ws] = await joined();
  const p = client.resume(10);
  const req = await ws.waitSent(3);
  await assert.rejects(p, (err) => err.code === 'timeout');
  ws.deliver({ type: 'ack', id: req.id }); // must not throw or resolve anything
});

test('a closed socket rejects requests in flight and later ones', async () => {
  const [client, ws] = await joined();
  const p = client.setLayers(10, 2);
  await ws.waitSent(3);
  const closed = client.once('close');
  ws.close(1008, 'policy');
  await assert.rejects(p, (err) => err.code === 'closed');
  assert.deepEqual(await closed, { code: 1008, reason: 'policy' });
  await assert.rejects(client.pause(10), (err) => err.code === 'not_connected');
});

test('a failed join rejects connect with the code', async () => {
  const client = new KcsClient();
  const done = client.connect({ url: 'ws://edge.test/ws', token: 'expired', timeoutMs: 200 });
  await new Promise((r) => setTimeout(r, 0));
  const ws = FakeSocket.last;
  ws.deliver({ type: 'ack', id: (await ws.waitSent(1)).id });
  ws.deliver({ type: 'error', id: (await ws.waitSent(2)).id, code: 'token_expired', message: 'expired' });
  await assert.rejects(done, (err) => err.code === 'token_expired');
});

test('room events update the model, are re-emitted, and a seq gap is reported', async () => {
  const [client, ws] = await joined();
  const seen = [];
  client.on('*', (type) => seen.push(type));
  const gaps = [];
  client.on('seq-gap', (g) => gaps.push(g));
  ws.deliver({ type: 'participant:joined', participant: { id: 3, identity: 'carol', role: 'host' }, seq: 6 });
  ws.deliver({ type: 'track:published', track: { id: 11, participant: 3, source: 'microphone', kind: 'audio' }, seq: 7 });
  assert.equal(client.participants.get(3).identity, 'carol');
  assert.equal(client.tracks.get(11).kind, 'audio');
  ws.deliver({ type: 'track:unpublished', track: 11, participant: 3, seq: 8 });
  assert.equal(client.tracks.has(11), false);
  ws.deliver({ type: 'participant:left', participant: 2, seq: 10 });
  assert.equal(client.participants.has(2), false);
  assert.equal(client.tracks.has(10), false, "a leaving participant's tracks go too");
  assert.deepEqual(gaps, [{ expected: 9, got: 10 }]);
  assert.deepEqual(seen, ['participant:joined', 'track:published', 'track:unpublished', 'seq-gap', 'participant:left']);
});

test('an unsolicited error and a non-JSON frame are emitted as errors, not thrown', async () => {
  const [client, ws] = await joined();
  const errors = [];
  client.on('error', (e) => errors.push(e.code));
  ws.deliver({ type: 'error', id: null, code: 'rate_limited', message: 'slow down' });
  ws.onmessage({ data: 'not json' });
  assert.deepEqual(errors, ['rate_limited', 'protocol']);
});

test('subscriber bindings: track for new mids, trackended for dropped or rebound ones', () => {
  const client = new KcsClient();
  const rx = (kind) => ({ track: { kind }, getStats: async () => new Map() });
  const pc = { getTransceivers: () => [{ mid: '0', receiver: rx('video') }, { mid: '1', receiver: rx('audio') }] };
  const events = [];
  client.on('track', (t) => events.push(['track', t.mid, t.trackId]));
  client.on('trackended', (t) => events.push(['ended', t.mid, t.trackId]));
  client._rebind(pc, [{ mid: '0', track: 10, participant: 2, source: 'camera', kind: 'video' }]);
  client._rebind(pc, [
    { mid: '0', track: 10, participant: 2, source: 'camera', kind: 'video' },
    { mid: '1', track: 11, participant: 2, source: 'microphone', kind: 'audio' },
  ]);
  client._rebind(pc, [{ mid: '1', track: 12, participant: 3, source: 'microphone', kind: 'audio' }]);
  assert.deepEqual(events, [
    ['track', '0', 10],
    ['track', '1', 11],
    ['ended', '0', 10],
    ['ended', '1', 11],
    ['track', '1', 12],
  ]);
  assert.deepEqual([...client.remoteTracks.keys()], [12]);
});

test('layer from the rendered tile height', () => {
  const table = [[0, 0], [120, 0], [180, 0], [181, 1], [360, 1], [361, 2], [720, 2], [2160, 2]];
  for (const [height, layer] of table) assert.equal(maxSpatialForHeight(height), layer, `height ${height}`);
});

test('idOf takes ids or objects with one', () => {
  assert.equal(idOf(3), 3);
  assert.equal(idOf('p3'), 'p3');
  assert.equal(idOf({ id: 0 }), 0);
  assert.equal(idOf(null), undefined);
});
