// @ts-check
/**
 * @file meet-layout.js — what the meeting page shows where, as plain functions of the room
 * state (no DOM, no client): which tile goes on the large stage, the order of the grid, the
 * meeting timer's text and the connection quality from WebRTC statistics.
 *
 * Why a module of its own: these rules are the ones people notice when they are wrong ("the
 * screen share is small", "the wrong person is big"), and as pure functions they are unit-tested
 * in Node (tests/e2e/client_unit.test.mjs) without a browser.
 */

/**
 * @typedef {string|number} Id
 *
 * @typedef {object} StageInput
 * @property {'grid'|'speaker'} view the layout the user chose
 * @property {Id|null} you our participant id
 * @property {Id[]} participants everyone in the room (us included), in join order
 * @property {Array<{track: Id, participant: Id}>} screens screen shares being received or
 *   sent, oldest first
 * @property {Id|null} spotlight participant the host spotlighted for everyone
 * @property {Id|null} pinned participant this user pinned for themselves
 * @property {Id|null} activeSpeaker from `speaker:active`
 * @property {Id|null} lastSpeaker the last remote participant that was the active speaker
 *
 * @typedef {{kind: 'screen', track: Id, participant: Id}
 *   | {kind: 'participant', participant: Id, reason: 'spotlight'|'pinned'|'speaker'}
 *   | null} Stage
 */

/**
 * Chooses what the large stage shows. In order: the newest screen share (a share is what the
 * room is looking at), the host's spotlight (everyone sees the same person), the user's own pin,
 * then in speaker view the active speaker — when that is ourselves, the last remote speaker
 * (nobody wants to watch themselves big), else the first remote participant. In grid view with
 * nothing shared, spotlighted or pinned there is no stage: every tile is the same size.
 * @param {StageInput} s
 * @returns {Stage}
 */
export function chooseStage(s) {
  const present = new Set(s.participants);
  const screen = [...s.screens].reverse().find((x) => present.has(x.participant));
  if (screen) return { kind: 'screen', track: screen.track, participant: screen.participant };
  if (s.spotlight != null && present.has(s.spotlight)) {
    return { kind: 'participant', participant: s.spotlight, reason: 'spotlight' };
  }
  if (s.pinned != null && present.has(s.pinned)) {
    return { kind: 'participant', participant: s.pinned, reason: 'pinned' };
  }
  if (s.view !== 'speaker') return null;
  const remote = (/** @type {Id|null} */ id) => id != null && id !== s.you && present.has(id);
  const speaker = remote(s.activeSpeaker) ? s.activeSpeaker
    : remote(s.lastSpeaker) ? s.lastSpeaker
      : s.participants.find((id) => id !== s.you) ?? null;
  if (speaker == null) return null;
  return { kind: 'participant', participant: speaker, reason: 'speaker' };
}

/**
 * Order of the participant tiles in the grid: raised hands first (in the order they were
 * raised, so the host sees the queue), then everyone else in join order. Ourselves stay where
 * we joined.
 * @param {Id[]} participants in join order
 * @param {Id[]} hands raised hands, oldest first
 * @returns {Id[]}
 */
export function gridOrder(participants, hands) {
  const present = new Set(participants);
  const raised = hands.filter((id) => present.has(id));
  const raisedSet = new Set(raised);
  return [...raised, ...participants.filter((id) => !raisedSet.has(id))];
}

/**
 * The meeting timer's text: `m:ss` under an hour, `h:mm:ss` after.
 * @param {number} ms elapsed milliseconds (negative counts as 0)
 * @returns {string}
 */
export function formatElapsed(ms) {
  const total = Math.max(0, Math.floor(ms / 1000));
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  const ss = String(s).padStart(2, '0');
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${ss}` : `${m}:${ss}`;
}

/**
 * Thresholds of the quality dot. A round trip under 150 ms and loss under 2% is a call nobody
 * notices; past 400 ms or 8% loss speech breaks up and video freezes (the usual VoIP figures:
 * ITU-T G.114 puts the comfortable one-way delay under 150 ms, Opus conceals a few % of loss).
 */
export const QUALITY_THRESHOLDS = Object.freeze({
  goodRttMs: 150,
  goodLoss: 0.02,
  poorRttMs: 400,
  poorLoss: 0.08,
});

/**
 * Connection quality from measured round trip time and packet loss fraction.
 * @param {{rttMs: number|null, loss: number|null}} m `null` when not measured yet
 * @returns {'good'|'fair'|'poor'|'unknown'}
 */
export function qualityOf(m) {
  if (m.rttMs == null && m.loss == null) return 'unknown';
  const rtt = m.rttMs ?? 0;
  const loss = m.loss ?? 0;
  const t = QUALITY_THRESHOLDS;
  if (rtt > t.poorRttMs || loss > t.poorLoss) return 'poor';
  if (rtt > t.goodRttMs || loss > t.goodLoss) return 'fair';
  return 'good';
}

/**
 * Loss fraction between two samples of cumulative counters (received and lost packets);
 * `null` when nothing arrived in between.
 * @param {{received: number, lost: number}|null} before
 * @param {{received: number, lost: number}} now
 * @returns {number|null}
 */
export function lossBetween(before, now) {
  const received = now.received - (before?.received ?? 0);
  const lost = Math.max(0, now.lost - (before?.lost ?? 0));
  if (received + lost <= 0) return null;
  return lost / (received + lost);
}

/**
 * Two-letter initials of a display name for the tile of a participant without video.
 * @param {string} name
 * @returns {string}
 */
export function initials(name) {
  const words = name.trim().split(/[\s._-]+/).filter(Boolean);
  if (words.length === 0) return '?';
  if (words.length === 1) return words[0].slice(0, 2).toUpperCase();
  return (words[0][0] + words[1][0]).toUpperCase();
}

/**
 * The line under the people list for those it does not name: a large room lists only its
 * interesting participants (and a full-presence roster past its first page is not listed
 * either), so the rest are a number.
 * @param {number} count participants in the room (`participantCount`)
 * @param {number} listed how many the list shows
 * @returns {string} `and N others`, or '' when everyone is listed
 */
export function othersLine(count, listed) {
  const n = Math.max(0, Math.floor(count) - listed);
  if (!Number.isFinite(n) || n === 0) return '';
  return n === 1 ? 'and 1 other' : `and ${n} others`;
}
