// Unit tests of edge-node/web/meet-layout.js, the meeting page's rules of what goes where:
// the stage (screen share > spotlight > pin > active speaker), the grid order (raised hands
// first), the timer text, the quality dot and initials.
//
// Run: node --test tests/e2e/meet_layout.test.mjs
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  chooseStage, gridOrder, formatElapsed, qualityOf, lossBetween, initials, othersLine,
  QUALITY_THRESHOLDS,
} from '../../edge-node/web/meet-layout.js';

const base = {
  view: 'grid', you: 1, participants: [1, 2, 3, 4], screens: [], spotlight: null, pinned: null,
  activeSpeaker: null, lastSpeaker: null,
};

test('stage: what is large, in priority order', () => {
  const table = [
    ['grid, nothing special: no stage', {}, null],
    ['speaker view, nobody spoke: first remote', { view: 'speaker' }, { kind: 'participant', participant: 2, reason: 'speaker' }],
    ['speaker view: the active speaker', { view: 'speaker', activeSpeaker: 3 }, { kind: 'participant', participant: 3, reason: 'speaker' }],
    ['speaker view, we speak: the last remote speaker', { view: 'speaker', activeSpeaker: 1, lastSpeaker: 4 }, { kind: 'participant', participant: 4, reason: 'speaker' }],
    ['speaker view, the active speaker left', { view: 'speaker', activeSpeaker: 9 }, { kind: 'participant', participant: 2, reason: 'speaker' }],
    ['speaker view alone: no stage', { view: 'speaker', participants: [1] }, null],
    ['pin beats speaker', { view: 'speaker', activeSpeaker: 3, pinned: 4 }, { kind: 'participant', participant: 4, reason: 'pinned' }],
    ['pin in grid view', { pinned: 4 }, { kind: 'participant', participant: 4, reason: 'pinned' }],
    ['a pin of someone gone is ignored', { pinned: 9 }, null],
    ['spotlight beats pin', { pinned: 4, spotlight: 3 }, { kind: 'participant', participant: 3, reason: 'spotlight' }],
    ['screen beats spotlight', { spotlight: 3, screens: [{ track: 20, participant: 2 }] }, { kind: 'screen', track: 20, participant: 2 }],
    ['the newest screen', { screens: [{ track: 20, participant: 2 }, { track: 21, participant: 4 }] }, { kind: 'screen', track: 21, participant: 4 }],
    ['a screen of someone gone is skipped', { screens: [{ track: 20, participant: 2 }, { track: 21, participant: 9 }] }, { kind: 'screen', track: 20, participant: 2 }],
    ['our own screen share is staged too', { screens: [{ track: 22, participant: 1 }] }, { kind: 'screen', track: 22, participant: 1 }],
  ];
  for (const [what, change, expected] of table) {
    assert.deepEqual(chooseStage({ ...base, ...change }), expected, what);
  }
});

test('grid order: raised hands first in the order raised, then join order', () => {
  assert.deepEqual(gridOrder([1, 2, 3, 4], []), [1, 2, 3, 4]);
  assert.deepEqual(gridOrder([1, 2, 3, 4], [4, 2]), [4, 2, 1, 3]);
  assert.deepEqual(gridOrder([1, 2, 3], [9, 3]), [3, 1, 2], 'a hand of someone gone is ignored');
});

test('timer text', () => {
  const table = [[-5, '0:00'], [0, '0:00'], [999, '0:00'], [61_000, '1:01'], [3_599_000, '59:59'], [3_600_000, '1:00:00'], [3_723_000, '1:02:03']];
  for (const [ms, text] of table) assert.equal(formatElapsed(ms), text, `${ms} ms`);
});

test('quality dot from RTT and loss', () => {
  const t = QUALITY_THRESHOLDS;
  const table = [
    [{ rttMs: null, loss: null }, 'unknown'],
    [{ rttMs: 20, loss: 0 }, 'good'],
    [{ rttMs: 20, loss: null }, 'good'],
    [{ rttMs: t.goodRttMs + 1, loss: 0 }, 'fair'],
    [{ rttMs: 20, loss: t.goodLoss + 0.01 }, 'fair'],
    [{ rttMs: t.poorRttMs + 1, loss: 0 }, 'poor'],
    [{ rttMs: null, loss: t.poorLoss + 0.01 }, 'poor'],
  ];
  for (const [m, q] of table) assert.equal(qualityOf(m), q, JSON.stringify(m));
});

test('loss between two samples of cumulative counters', () => {
  assert.equal(lossBetween(null, { received: 0, lost: 0 }), null);
  assert.equal(lossBetween({ received: 100, lost: 0 }, { received: 100, lost: 0 }), null, 'nothing arrived');
  assert.equal(lossBetween({ received: 100, lost: 0 }, { received: 190, lost: 10 }), 0.1);
  assert.equal(lossBetween(null, { received: 99, lost: 1 }), 0.01);
  assert.equal(lossBetween({ received: 100, lost: 10 }, { received: 200, lost: 5 }), 0, 'lost can go down (late packets)');
});

test('initials for tiles without video', () => {
  const table = [['alice', 'AL'], ['Alice Smith', 'AS'], ['guest-1a2b3c', 'G1'], ['  ', '?'], ['x', 'X']];
  for (const [name, text] of table) assert.equal(initials(name), text, name);
});

test('people list: the ones it does not name are a number', () => {
  assert.equal(othersLine(3, 3), '');
  assert.equal(othersLine(2, 3), '', 'never negative (the count lags the roster)');
  assert.equal(othersLine(4, 3), 'and 1 other');
  assert.equal(othersLine(10000, 12), 'and 9988 others');
});
