// Unit tests of edge-node/web/kcs-client.js in Node, with a scripted fake WebSocket (no browser,
// no edge): request/ack correlation, error codes, timeouts, socket close, the room model, seq
// gaps, the mid -> track bindings of the subscriber PC, the tile-size layer rule, and the
// meeting features of protocol 2: the lobby, batched presence, roles, hands, chat order, host
// mute, removal, quality and resuming after a dropped socket.
//
// Run: node --test tests/e2e/client_unit.test.mjs
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  KcsClient, KcsError, maxSpatialForHeight, idOf, PROTOCOL_VERSION, PERMISSIONS, ROLES,
} from '../../edge-node/web/kcs-client.js';

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
    if (this.readyState === 3) return;
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
  assert.equal(hello.version, PROTOCOL_VERSION);
  assert.equal(PROTOCOL_VERSION, 2);
  ws.deliver({ type: 'ack', id: hello.id, version: 1, server: 'fake' });
  const join = await ws.waitSent(2);
  assert.equal(join.type, 'room:join');
  assert.equal(join.token, 'tok');
  assert.equal(join.autoSubscribe, true);
  ws.deliver({
    type: 'ack', id: join.id, room: 'r', you: { id: 1, identity: 'me', role: 'host' },
    participants: [{ id: 2, identity: 'bob', role: 'host' }],
    tracks: [{ id: 10, participant: 2, source: 'camera', kind: 'video', layers: 3 }],
    seq: 5, resumeToken: 'resume-1', ...joinAck,
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
  client.on('*', (type) => type !== 'room' && seen.push(type));
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

// --- protocol 2: the meeting ---------------------------------------------------------------

/** Flushes pending microtasks and timers of 0 ms. */
const tick = () => new Promise((r) => setTimeout(r, 0));

test('a join into the lobby waits, and room:joined brings the room state', async () => {
  const client = new KcsClient();
  const done = client.connect({ url: 'ws://edge.test/ws', token: 'guest', timeoutMs: 200 });
  await tick();
  const ws = FakeSocket.last;
  ws.deliver({ type: 'ack', id: (await ws.waitSent(1)).id, version: 2 });
  const join = await ws.waitSent(2);
  ws.deliver({ type: 'ack', id: join.id, waiting: true, room: 'r', you: { id: 9, identity: 'bob', role: 'attendee' } });
  await done;
  assert.equal(client.waiting, true);
  assert.equal(client.id, 9);
  const admitted = client.once('room:joined');
  ws.deliver({
    type: 'room:joined', room: 'r', you: { id: 9, identity: 'bob', role: 'attendee' },
    participants: [{ id: 1, identity: 'alice', role: 'host' }], participantCount: 2, tracks: [],
    chat: [{ id: 4, ts: 1, from: 1, to: null, text: 'welcome' }], hands: [1],
    settings: { locked: false, lobby: true, layout: 'speaker', spotlight: null, streaming: false },
    seq: 12, resumeToken: 'rt',
  });
  await admitted;
  assert.equal(client.waiting, false);
  assert.deepEqual([...client.participants.keys()].sort(), [1, 9]);
  assert.equal(client.participantCount, 2);
  assert.deepEqual(client.hands, [1]);
  assert.equal(client.settings.layout, 'speaker');
  assert.deepEqual(client.chat.map((m) => m.text), ['welcome']);
  assert.equal(client.seq, 12);
  assert.equal(client.resumeToken, 'rt');
});

test('batched joins and leaves update the roster and the count', async () => {
  const [client, ws] = await joined({ participantCount: 2 });
  ws.deliver({
    type: 'participant:joined', seq: 6,
    participants: [{ id: 3, identity: 'carol', role: 'attendee' }, { id: 4, identity: 'dan', role: 'attendee' }],
  });
  assert.equal(client.participantCount, 4);
  ws.deliver({ type: 'hand:raise', seq: 7, participant: 3, by: 3, hands: [3] });
  ws.deliver({ type: 'participant:left', seq: 8, participants: [2, 3] });
  assert.deepEqual([...client.participants.keys()].sort(), [1, 4]);
  assert.equal(client.participantCount, 2);
  assert.deepEqual(client.hands, [], "a leaver's hand goes down");
  assert.equal(client.tracks.has(10), false);
});

test('room:restored replaces the hands and settings a rebuilt room disagrees with', async () => {
  const [client, ws] = await joined({});
  ws.deliver({ type: 'hand:raise', seq: 6, participant: 2, by: 2, hands: [2] });
  ws.deliver({ type: 'layout:update', seq: 7, layout: 'speaker', spotlight: 2, by: 1 });
  let changes = 0;
  client.on('room', () => { changes += 1; });
  ws.deliver({
    type: 'room:restored', seq: 1009,
    settings: { locked: true, lobby: false, layout: 'grid', spotlight: null, streaming: false },
    hands: [1, 2],
  });
  assert.deepEqual(client.hands, [1, 2]);
  assert.equal(client.settings.locked, true);
  assert.equal(client.settings.layout, 'grid');
  assert.equal(client.settings.spotlight, null);
  assert.equal(changes, 1, 'one room change for listeners');
});

test('a large room: the count comes from participant:count, entries only name people', async () => {
  const [client, ws] = await joined({ participantCount: 5000, presence: 'interesting' });
  assert.equal(client.presence, 'interesting');
  assert.equal(client.participantCount, 5000);
  // An attendee who raised a hand is announced: a name, not a newcomer.
  ws.deliver({ type: 'participant:joined', seq: 6, participants: [{ id: 77, identity: 'eve', role: 'attendee' }] });
  ws.deliver({ type: 'hand:raise', seq: 7, participant: 77, by: 77, hands: [77] });
  assert.equal(client.participants.get(77).identity, 'eve');
  assert.equal(client.participantCount, 5000, 'an announcement does not count');
  ws.deliver({ type: 'participant:count', seq: 8, participantCount: 5123, presence: 'interesting' });
  assert.equal(client.participantCount, 5123);
  ws.deliver({ type: 'participant:left', seq: 9, participants: [77] });
  assert.equal(client.participants.has(77), false);
  assert.deepEqual(client.hands, []);
  assert.equal(client.participantCount, 5123, 'only participant:count moves the count');
  ws.deliver({ type: 'participant:count', seq: 10, participantCount: 5122, presence: 'interesting' });
  assert.equal(client.participantCount, 5122);
  assert.equal(client.seq, 10);
});

test('a room that turns large: the first participant:count switches the mode', async () => {
  const [client, ws] = await joined({ participantCount: 2 });
  assert.equal(client.presence, 'full');
  ws.deliver({ type: 'participant:joined', seq: 6, participants: [{ id: 3, identity: 'carol', role: 'attendee' }] });
  assert.equal(client.participantCount, 3, 'full presence counts the entries');
  let rooms = 0;
  client.on('room', () => { rooms += 1; });
  ws.deliver({ type: 'participant:count', seq: 7, participantCount: 40, presence: 'interesting' });
  assert.equal(client.presence, 'interesting');
  assert.equal(client.participantCount, 40);
  assert.equal(rooms, 1, 'the count is a room change');
  // Someone here since before is announced now: no double count.
  ws.deliver({ type: 'participant:joined', seq: 8, participants: [{ id: 9, identity: 'dan', role: 'presenter' }] });
  assert.equal(client.participantCount, 40);
  ws.deliver({ type: 'participant:count', seq: 9, participantCount: -1 });
  assert.equal(client.participantCount, 40, 'a nonsense count is ignored');
  // A resume or a rejoin takes the mode from its ack again.
  client._applyJoin({ room: 'r', you: { id: 1 }, participants: [], participantCount: 3, presence: 'full' });
  assert.equal(client.presence, 'full');
});

test('role:update of ourselves changes what we may do', async () => {
  const [client, ws] = await joined({ you: { id: 1, identity: 'me', role: 'attendee' } });
  assert.equal(client.can('mute_others'), false);
  assert.equal(client.can('publish'), true);
  ws.deliver({ type: 'role:update', seq: 6, participant: 1, role: 'co-host', by: 2 });
  assert.equal(client.you.role, 'co-host');
  assert.equal(client.participants.get(1).role, 'co-host');
  assert.equal(client.can('mute_others'), true);
  assert.equal(client.can('end'), false, 'only hosts end the meeting');
  for (const role of ROLES) assert.ok(PERMISSIONS[role].includes('chat'), `${role} may chat`);
});

test('chat keeps the room order whether the ack or the event comes first, once per message', async () => {
  const [client, ws] = await joined();
  const shown = [];
  client.on('chat', (m) => shown.push([m.id, m.index]));
  const sent = client.sendChat('mine');
  const req = await ws.waitSent(3);
  assert.deepEqual([req.type, req.text, 'to' in req], ['chat:send', 'mine', false]);
  // Our message (id 7) is acked before the event of someone else's earlier one (id 6).
  ws.deliver({ type: 'ack', id: req.id, message: { id: 7, ts: 2, from: 1, to: null, text: 'mine' } });
  assert.equal((await sent).id, 7);
  ws.deliver({ type: 'chat:receive', seq: 6, message: { id: 6, ts: 1, from: 2, to: null, text: 'theirs' } });
  ws.deliver({ type: 'chat:receive', seq: 7, message: { id: 7, ts: 2, from: 1, to: null, text: 'mine' } });
  assert.deepEqual(client.chat.map((m) => m.id), [6, 7]);
  assert.deepEqual(shown, [[7, 0], [6, 0]]);
  const direct = client.sendChat('psst', { to: 2 });
  const dreq = await ws.waitSent(4);
  assert.equal(dreq.to, 2);
  ws.deliver({ type: 'ack', id: dreq.id, message: { id: 8, ts: 3, from: 1, to: 2, text: 'psst' } });
  await direct;
  assert.deepEqual(client.chat.map((m) => [m.id, m.to]), [[6, null], [7, null], [8, 2]]);
});

test('meeting requests carry the protocol fields', async () => {
  const [client, ws] = await joined();
  const calls = [
    [() => client.muteRemote(2), { type: 'mute:remote', participant: 2, kind: 'audio', muted: true }],
    [() => client.muteRemote(2, { kind: 'video', muted: false }), { type: 'mute:remote', participant: 2, kind: 'video', muted: false }],
    [() => client.removeParticipant(2), { type: 'participant:remove', participant: 2 }],
    [() => client.setRole(2, 'presenter'), { type: 'role:update', participant: 2, role: 'presenter' }],
    [() => client.admit(9), { type: 'lobby:admit', participant: 9 }],
    [() => client.deny(9), { type: 'lobby:deny', participant: 9 }],
    [() => client.setSpotlight(2), { type: 'layout:update', spotlight: 2 }],
    [() => client.raiseHand(), { type: 'hand:raise' }],
    [() => client.lowerHand(), { type: 'hand:lower' }],
    [() => client.lowerHand(2), { type: 'hand:lower', participant: 2 }],
    [() => client.react('🎉'), { type: 'reaction:send', emoji: '🎉' }],
    [() => client.pin(2), { type: 'pin:user', participant: 2 }],
    [() => client.endForAll(), { type: 'room:close' }],
    [() => client.reportStats({ rttMs: 12.5, loss: 0.01, jitterMs: NaN, bitrate: -1 }),
      { type: 'stats:report', rtt: 12.5, loss: 0.01, jitter: 0, bitrate: 0 }],
  ];
  let n = 2;
  for (const [call, expected] of calls) {
    const p = call();
    const req = await ws.waitSent(++n);
    const { id, ...fields } = req;
    assert.deepEqual(fields, expected);
    ws.deliver({ type: 'ack', id });
    await p;
  }
});

test('a host mute disables our local track, is reported, and unmuting is refused', async () => {
  const [client, ws] = await joined();
  const mic = { kind: 'audio', enabled: true };
  client.publications.set('microphone', { source: 'microphone', track: mic, transceiver: null, trackId: 11 });
  client.tracks.set(11, { id: 11, participant: 1, source: 'microphone', kind: 'audio', muted: false });
  const told = client.once('muted-by-host');
  ws.deliver({ type: 'track:muted', seq: 6, track: 11, muted: true, hostMuted: true, by: 2 });
  ws.deliver({ type: 'mute:remote', kind: 'audio', muted: true, by: 2 });
  assert.deepEqual(await told, { kind: 'audio', by: 2 });
  assert.equal(mic.enabled, false);
  assert.equal(client.hostMuted('microphone'), true);
  const unmute = client.muteSelf('microphone', false);
  const req = await ws.waitSent(3);
  assert.deepEqual([req.type, req.track, req.muted], ['mute:self', 11, false]);
  ws.deliver({ type: 'error', id: req.id, code: 'muted_by_host', message: 'a moderator muted this track' });
  await assert.rejects(unmute, (err) => err.code === 'muted_by_host');
  assert.equal(mic.enabled, false, 'a refused unmute leaves the track disabled');
});

test('lobby updates, quality and invitations reach the model and listeners', async () => {
  const [client, ws] = await joined();
  ws.deliver({ type: 'lobby:update', waiting: [{ id: 9, identity: 'bob', role: 'attendee' }] });
  assert.deepEqual([...client.lobby.keys()], [9]);
  ws.deliver({ type: 'participant:joined', seq: 6, participants: [{ id: 9, identity: 'bob', role: 'attendee' }] });
  assert.equal(client.lobby.size, 0, 'an admitted participant leaves the lobby list');
  const q = client.once('quality');
  ws.deliver({ type: 'stats:update', quality: 'poor', audioOnly: true, rtt: 600, loss: 0.2, serverVideoShed: 1 });
  assert.deepEqual(await q, { quality: 'poor', audioOnly: true, rtt: 600, loss: 0.2 });
  const inv = client.once('invited');
  ws.deliver({ type: 'participant:add', room: 'other', token: 't', link: '/?room=other&token=t', by: 'alice', role: 'attendee' });
  assert.equal((await inv).link, '/?room=other&token=t');
});

test('a dropped socket is resumed with the resume token, and missed events follow', async () => {
  const [client, ws] = await joined();
  const reconnected = client.once('reconnected');
  let closed = false;
  client.on('close', () => { closed = true; });
  ws.close(1006, '');
  await tick();
  const ws2 = FakeSocket.last;
  assert.notEqual(ws2, ws);
  const hello = await ws2.waitSent(1);
  assert.equal(hello.type, 'hello');
  ws2.deliver({ type: 'ack', id: hello.id, version: 2 });
  const resume = await ws2.waitSent(2);
  assert.deepEqual([resume.type, resume.resumeToken, resume.lastSeq], ['reconnect:attempt', 'resume-1', 5]);
  ws2.deliver({
    type: 'ack', id: resume.id, room: 'r', you: { id: 1, identity: 'me', role: 'host' }, seq: 6,
    resumeToken: 'resume-2', resumed: true,
  });
  await reconnected;
  assert.equal(client.participants.get(2).identity, 'bob', 'the room model survives a resume');
  // Missed events follow: one sent on the old socket after lastSeq, one from while away.
  ws2.deliver({ type: 'hand:raise', seq: 6, participant: 2, by: 2, hands: [2] });
  ws2.deliver({ type: 'participant:joined', seq: 7, participants: [{ id: 3, identity: 'carol', role: 'attendee' }] });
  assert.equal(closed, false);
  assert.equal(client.resumeToken, 'resume-2');
  assert.deepEqual(client.hands, [2]);
  assert.ok(client.participants.has(3));
  assert.equal(client.seq, 7);
  const p = client.pause(10);
  ws2.deliver({ type: 'ack', id: (await ws2.waitSent(3)).id });
  await p;
});

test('no resume after a removal, and an expired resume token ends in close', async () => {
  const [client, ws] = await joined();
  const removed = client.once('removed');
  const closed = client.once('close');
  ws.deliver({ type: 'participant:remove', by: 2 });
  ws.close(1000, 'removed');
  assert.deepEqual(await removed, { by: 2 });
  await closed;
  assert.equal(FakeSocket.last, ws, 'no new socket after a removal');

  const [client2, ws3] = await joined();
  const closed2 = client2.once('close');
  ws3.close(1006, '');
  await tick();
  const ws4 = FakeSocket.last;
  ws4.deliver({ type: 'ack', id: (await ws4.waitSent(1)).id, version: 2 });
  ws4.deliver({ type: 'error', id: (await ws4.waitSent(2)).id, code: 'resume_invalid', message: 'gone' });
  assert.deepEqual(await closed2, { code: 1006, reason: '' });
  assert.equal(client2.connected, false);
});

test('hello falls back to version 1 when the edge does not speak 2', async () => {
  const client = new KcsClient();
  const done = client.connect({ url: 'ws://edge.test/ws', token: 'tok', timeoutMs: 200 });
  await tick();
  const ws = FakeSocket.last;
  const h2 = await ws.waitSent(1);
  assert.equal(h2.version, 2);
  ws.deliver({ type: 'error', id: h2.id, code: 'unsupported_version', message: 'this server speaks 1' });
  const h1 = await ws.waitSent(2);
  assert.deepEqual([h1.type, h1.version], ['hello', 1]);
  ws.deliver({ type: 'ack', id: h1.id, version: 1 });
  const join = await ws.waitSent(3);
  ws.deliver({ type: 'ack', id: join.id, room: 'r', you: { id: 1, identity: 'me', role: 'host' }, participants: [], tracks: [], seq: 0 });
  await done;
  assert.equal(client.version, 1);
});

test('an acked lobby or lock change holds before its room:update arrives', async () => {
  const [client, ws] = await joined();
  const p = client.setLobby(true);
  const req = await ws.waitSent(3);
  assert.deepEqual([req.type, req.enabled], ['room:lobby', true]);
  ws.deliver({ type: 'ack', id: req.id });
  await p;
  assert.equal(client.settings.lobby, true);
  const q = client.setLocked(true);
  const lreq = await ws.waitSent(4);
  ws.deliver({ type: 'error', id: lreq.id, code: 'forbidden', message: 'no' });
  await assert.rejects(q, (err) => err.code === 'forbidden');
  assert.equal(client.settings.locked, false, 'a refused change changes nothing');
});
