// @ts-check
/**
 * @file meet.js — the meeting page an edge serves at `/`: a prejoin lobby (devices, preview,
 * "Join with audio" / "Join with video", join muted / camera off), then the meeting: a grid or
 * speaker view with the active speaker highlighted, pin and spotlight, screen shares large with
 * the presenter named, chat, reactions, raised hands, the participant list with the host's
 * controls, the meeting timer and a connection quality dot.
 *
 * Why it is built this way: all protocol work is in kcs-client.js (signaling, the two peer
 * connections, the room model); the rules of what goes where are pure functions in
 * meet-layout.js. This file only turns the room model into DOM and user actions into client
 * calls, and it re-renders from the model after every event rather than patching pieces, so
 * the screen cannot drift from the room state.
 *
 * Query string: `room` (required), `token` (else the dev-only `GET /dev/token` is asked, with
 * `role` when given), `name`, `fps` (camera frame rate, default 30: tests lower it to spare
 * CPU). Everything else is chosen on the page.
 *
 * Keyboard: every control is a button or a form field (Tab / Shift+Tab, Enter / Space), and
 * Alt+A microphone, Alt+V camera, Alt+S screen share, Alt+H hand, Alt+P people, Alt+C chat.
 *
 * For tests and debugging the page's state is on `window.meet` (`client`, `state`, `errors`,
 * `stats`).
 */
import { KcsClient, KcsError, idOf, REACTIONS, ROLES } from './kcs-client.js';
import {
  chooseStage, gridOrder, formatElapsed, qualityOf, lossBetween, initials, othersLine,
} from './meet-layout.js';

/** @typedef {import('./kcs-client.js').Id} Id */

const params = new URLSearchParams(location.search);
/** Camera capture: 1280x720 so that Chromium sends all three simulcast layers. */
const CAMERA_CONSTRAINTS = {
  width: { ideal: 1280 }, height: { ideal: 720 }, frameRate: { ideal: Number(params.get('fps') ?? 30) },
};
/** How often the quality dot is measured and reported (stats:report). */
const QUALITY_INTERVAL_MS = 3000;
/** How long a toast stays. */
const TOAST_MS = 5000;
/** Spoken names of the reactions (screen readers read emoji unevenly). */
/** @type {Record<string, string>} */
const REACTION_NAMES = {
  '👍': 'thumbs up', '❤️': 'heart', '😂': 'laughing', '😮': 'surprised', '👏': 'applause', '🎉': 'celebration',
};

const client = new KcsClient();
/** @type {string[]} */
const errors = [];

/** Everything the page shows that is not in the client's room model. */
const state = {
  /** @type {'prejoin'|'waiting'|'meeting'|'ended'} */
  phase: 'prejoin',
  /** @type {'grid'|'speaker'} */
  view: 'grid',
  /** @type {Id|null} participant pinned by this user */
  pinned: null,
  /** @type {Id|null} */
  activeSpeaker: null,
  /** @type {Id|null} */
  lastSpeaker: null,
  /** @type {number|null} ms since epoch the meeting (or our join) started */
  startedAt: null,
  micMuted: false,
  camOn: false,
  sharing: false,
  /** @type {'good'|'fair'|'poor'|'unknown'} */
  quality: 'unknown',
  /** @type {string|null} the server's advice (audio only) */
  recommendation: null,
  unread: 0,
  leaving: false,
  /** @type {{received: number, lost: number}|null} */
  lastCounters: null,
  /** Join order of participants (ids), for a stable grid. */
  /** @type {Id[]} */
  order: [],
  /** Screen shares in the room, oldest first. */
  /** @type {Array<{track: Id, participant: Id}>} */
  screens: [],
};

/** Room settings the user changed and the server has not answered yet. @type {Set<string>} */
const togglesInFlight = new Set();

/** Local media. */
const local = {
  /** @type {MediaStream|null} the prejoin preview */
  preview: null,
  /** @type {MediaStreamTrack|null} */
  mic: null,
  /** @type {MediaStreamTrack|null} */
  cam: null,
  /** @type {MediaStreamTrack|null} */
  screen: null,
};

/**
 * One tile per participant (ourselves included).
 * @type {Map<Id, {el: HTMLElement, video: HTMLVideoElement, avatar: HTMLElement,
 *   name: HTMLElement, hand: HTMLElement, muted: HTMLElement, pin: HTMLButtonElement,
 *   cameraTrack: Id|null, stopFit: (() => void)|null}>}
 */
const tiles = new Map();
/**
 * One tile per screen share (received, or our own).
 * @type {Map<Id, {el: HTMLElement, video: HTMLVideoElement, participant: Id}>}
 */
const screenTiles = new Map();
/** @type {Map<Id, HTMLAudioElement>} */
const audios = new Map();

const $ = (/** @type {string} */ id) => /** @type {HTMLElement} */ (document.getElementById(id));
const button = (/** @type {string} */ id) => /** @type {HTMLButtonElement} */ ($(id));

// --- small helpers ---------------------------------------------------------------------------

/** Shows an error on the page (and keeps it for tests). @param {unknown} err */
function showError(err) {
  const text = err instanceof Error ? err.message : String(err);
  errors.push(text);
  const box = $('errors');
  box.hidden = false;
  box.textContent = errors.slice(-3).join('\n');
  console.error('kcs:', err);
}

/** A short notice that goes away by itself (screen readers hear it: role=status). @param {string} text */
function toast(text) {
  const p = document.createElement('p');
  p.textContent = text;
  $('toasts').append(p);
  setTimeout(() => p.remove(), TOAST_MS);
}

/**
 * Runs a user action; a refusal by the server is shown as a toast with its reason, anything
 * else as an error.
 * @param {() => Promise<unknown>} fn
 */
function act(fn) {
  fn().catch((err) => {
    if (err instanceof KcsError && err.code !== 'internal' && err.code !== 'protocol') {
      toast(`Not done: ${err.message}`);
      errors.push(`refused: ${err.code}`);
    } else {
      showError(err);
    }
  });
}

/** @param {Id|null|undefined} id */
function nameOf(id) {
  if (id == null) return '?';
  const p = client.participants.get(id);
  return p?.name || p?.identity || String(id);
}

/** @param {Id} id */
function isYou(id) {
  return client.you != null && id === client.you.id;
}

/** @param {string} phase */
function showPhase(phase) {
  state.phase = /** @type {any} */ (phase);
  for (const id of ['prejoin', 'waiting', 'meeting', 'ended']) $(id).hidden = id !== phase;
}

// --- prejoin lobby ---------------------------------------------------------------------------

/** Fills the device selects (labels are known once a permission was granted). */
async function listDevices() {
  const devices = await navigator.mediaDevices.enumerateDevices();
  const fill = (/** @type {HTMLSelectElement} */ select, /** @type {string} */ kind, /** @type {string|undefined} */ current) => {
    const keep = current ?? select.value;
    select.replaceChildren();
    let n = 0;
    for (const d of devices) {
      if (d.kind !== kind) continue;
      n += 1;
      select.add(new Option(d.label || `${kind === 'videoinput' ? 'Camera' : 'Microphone'} ${n}`, d.deviceId));
    }
    if (keep && [...select.options].some((o) => o.value === keep)) select.value = keep;
  };
  const cam = local.preview?.getVideoTracks()[0]?.getSettings().deviceId;
  const mic = local.preview?.getAudioTracks()[0]?.getSettings().deviceId;
  fill(/** @type {HTMLSelectElement} */ ($('camera-select')), 'videoinput', cam);
  fill(/** @type {HTMLSelectElement} */ ($('mic-select')), 'audioinput', mic);
}

/** (Re)starts the preview with the chosen devices; the camera only when it is not off. */
async function startPreview() {
  const camOff = /** @type {HTMLInputElement} */ ($('camera-off')).checked;
  const camId = /** @type {HTMLSelectElement} */ ($('camera-select')).value;
  const micId = /** @type {HTMLSelectElement} */ ($('mic-select')).value;
  local.preview?.getTracks().forEach((t) => t.stop());
  local.preview = null;
  const video = camOff ? false : { ...CAMERA_CONSTRAINTS, ...(camId ? { deviceId: { exact: camId } } : {}) };
  const audio = micId ? { deviceId: { exact: micId } } : true;
  try {
    local.preview = await navigator.mediaDevices.getUserMedia({ video, audio });
  } catch (err) {
    $('preview-note').textContent = `No camera or microphone: ${/** @type {Error} */ (err).message}`;
    return;
  }
  /** @type {HTMLVideoElement} */ ($('preview')).srcObject = local.preview;
  $('preview-note').textContent = camOff ? 'Camera is off' : 'Camera preview';
  await listDevices();
}

/** @param {string} room @returns {Promise<string>} a dev token for the room */
async function devToken(room) {
  const q = new URLSearchParams({ room });
  if (params.get('role')) q.set('role', /** @type {string} */ (params.get('role')));
  const res = await fetch(`/dev/token?${q}`);
  if (!res.ok) {
    const body = (await res.text()).slice(0, 200);
    throw new Error(`no token in the URL and GET /dev/token answered ${res.status}: ${body}`);
  }
  const body = await res.json();
  if (typeof body.token !== 'string') throw new Error('GET /dev/token returned no token');
  return body.token;
}

/**
 * Joins with the microphone, and the camera when `withVideo` and the camera is not off.
 * @param {boolean} withVideo
 */
async function join(withVideo) {
  const room = /** @type {string} */ (params.get('room'));
  for (const id of ['join-audio', 'join-video']) button(id).disabled = true;
  $('prejoin-state').textContent = 'Joining…';
  const camOff = /** @type {HTMLInputElement} */ ($('camera-off')).checked;
  const muted = /** @type {HTMLInputElement} */ ($('join-muted')).checked;
  const name = /** @type {HTMLInputElement} */ ($('name')).value.trim();
  if (name) localStorage.setItem('kcs-name', name);

  // The preview's tracks become the published ones: no second permission prompt, no flicker.
  if (!local.preview) await startPreview();
  local.mic = local.preview?.getAudioTracks()[0] ?? null;
  const previewCam = local.preview?.getVideoTracks()[0] ?? null;
  if (withVideo && !camOff) {
    local.cam = previewCam;
  } else {
    previewCam?.stop();
  }
  /** @type {HTMLVideoElement} */ ($('preview')).srcObject = null;

  const token = params.get('token') ?? (await devToken(room));
  const ack = await client.connect({ token, name: name || undefined });
  if (client.waiting) {
    showPhase('waiting');
    enterMeeting(await client.once('room:joined'));
  } else {
    enterMeeting(ack);
  }

  /** @type {Array<{track: MediaStreamTrack, source: string}>} */
  const items = [];
  if (local.cam) items.push({ track: local.cam, source: 'camera' });
  if (local.mic) items.push({ track: local.mic, source: 'microphone' });
  if (items.length) await client.publishAll(items);
  state.camOn = local.cam !== null;
  if (muted && local.mic) await setMicMuted(true);
  render();
}

// --- entering and leaving --------------------------------------------------------------------

/** @param {any} ack the room:join ack */
function enterMeeting(ack) {
  showPhase('meeting');
  state.startedAt = typeof ack?.startedAt === 'number' ? ack.startedAt : Date.now();
  for (const id of client.participants.keys()) noteJoined(id);
  for (const t of client.tracks.values()) noteTrack(t);
  ensureTile(/** @type {Id} */ (client.you?.id));
  setInterval(() => {
    $('timer').textContent = formatElapsed(Date.now() - /** @type {number} */ (state.startedAt));
  }, 1000);
  setInterval(() => measureQuality().catch(() => {}), QUALITY_INTERVAL_MS);
  render();
  button('mic').focus();
}

/**
 * Shows the end screen.
 * @param {string} reason what happened, in a sentence
 * @param {string} [title]
 */
function ended(reason, title = 'The meeting is over for you') {
  if (state.phase === 'ended') return;
  for (const t of [local.mic, local.cam, local.screen]) t?.stop();
  local.preview?.getTracks().forEach((t) => t.stop());
  client.close();
  $('ended-title').textContent = title;
  $('ended-reason').textContent = reason;
  /** @type {HTMLAnchorElement} */ ($('rejoin')).href = location.href;
  showPhase('ended');
  $('ended-title').focus?.();
}

async function leave() {
  state.leaving = true;
  await client.leave().catch(() => {});
  ended('Thanks for joining.', 'You left the meeting');
}

// --- room model -> tiles -----------------------------------------------------------------------

/** @param {Id} id */
function noteJoined(id) {
  if (!state.order.includes(id)) state.order.push(id);
}

/** @param {import('./kcs-client.js').TrackInfo} t */
function noteTrack(t) {
  if (t.source === 'screen' && !state.screens.some((s) => s.track === t.id)) {
    state.screens.push({ track: t.id, participant: t.participant });
  }
}

/** @param {Id} id */
function ensureTile(id) {
  let tile = tiles.get(id);
  if (tile) return tile;
  const el = document.createElement('figure');
  el.className = 'tile';
  el.dataset.participant = String(id);
  el.tabIndex = -1;
  const video = document.createElement('video');
  video.autoplay = true;
  video.muted = true;
  video.playsInline = true;
  video.hidden = true;
  const avatar = document.createElement('div');
  avatar.className = 'avatar';
  avatar.setAttribute('aria-hidden', 'true');
  const caption = document.createElement('figcaption');
  const name = document.createElement('span');
  name.className = 'name';
  const muted = document.createElement('span');
  muted.className = 'badge-muted';
  muted.textContent = '🔇';
  muted.setAttribute('role', 'img');
  muted.setAttribute('aria-label', 'microphone muted');
  muted.hidden = true;
  const hand = document.createElement('span');
  hand.className = 'badge-hand';
  hand.textContent = '✋';
  hand.setAttribute('role', 'img');
  hand.setAttribute('aria-label', 'hand raised');
  hand.hidden = true;
  const pin = document.createElement('button');
  pin.type = 'button';
  pin.className = 'pin';
  pin.setAttribute('aria-pressed', 'false');
  pin.addEventListener('click', () => {
    state.pinned = state.pinned === id ? null : id;
    render();
    // The edge then forwards the pinned video at the best layer the (now large) tile asks for.
    if (!isYou(id)) act(() => client.pin(state.pinned));
  });
  caption.append(name, muted, hand, pin);
  el.append(video, avatar, caption);
  if (isYou(id)) {
    el.classList.add('local');
    if (local.cam) {
      video.srcObject = new MediaStream([local.cam]);
      video.hidden = false;
    }
  }
  tile = { el, video, avatar, name, hand, muted, pin, cameraTrack: null, stopFit: null };
  tiles.set(id, tile);
  $('grid').append(el);
  return tile;
}

/** @param {Id} id */
function removeTile(id) {
  const tile = tiles.get(id);
  if (!tile) return;
  tile.stopFit?.();
  tile.el.remove();
  tiles.delete(id);
}

/** @param {import('./kcs-client.js').RemoteTrack} remote */
function onTrack(remote) {
  if (remote.kind === 'audio') {
    const audio = document.createElement('audio');
    audio.autoplay = true;
    audio.srcObject = new MediaStream([remote.track]);
    audio.dataset.track = String(remote.trackId);
    audio.dataset.participant = String(remote.participant);
    document.body.append(audio);
    audios.set(remote.trackId, audio);
    audio.play().catch(() => {
      // Autoplay with sound needs a user gesture in most browsers: play on the first click.
      document.addEventListener('click', () => audio.play().catch(() => {}), { once: true });
    });
    return;
  }
  if (remote.source === 'screen') {
    noteTrack({ id: remote.trackId, participant: remote.participant, source: 'screen', kind: 'video' });
    const el = screenTile(remote.trackId, remote.participant, new MediaStream([remote.track]));
    el.dataset.track = String(remote.trackId);
    render();
    return;
  }
  const tile = ensureTile(remote.participant);
  tile.stopFit?.();
  tile.cameraTrack = remote.trackId;
  tile.el.dataset.track = String(remote.trackId);
  tile.video.srcObject = new MediaStream([remote.track]);
  tile.video.hidden = false;
  // The layer this tile asks for follows its rendered size (stage: high, grid: low or mid).
  tile.stopFit = client.fitLayers(remote.trackId, tile.video);
  render();
}

/**
 * Creates the large tile of a screen share, named after its presenter.
 * @param {Id} trackId @param {Id} participant @param {MediaStream} stream
 */
function screenTile(trackId, participant, stream) {
  const el = document.createElement('figure');
  el.className = 'tile screen';
  el.dataset.participant = String(participant);
  const video = document.createElement('video');
  video.autoplay = true;
  video.muted = true;
  video.playsInline = true;
  video.srcObject = stream;
  const caption = document.createElement('figcaption');
  const label = document.createElement('span');
  label.className = 'presenter';
  caption.append(label);
  el.append(video, caption);
  screenTiles.set(trackId, { el, video, participant });
  return el;
}

/** @param {{trackId: Id}} e */
function onTrackEnded(e) {
  const audio = audios.get(e.trackId);
  if (audio) {
    audio.remove();
    audios.delete(e.trackId);
  }
  const screen = screenTiles.get(e.trackId);
  if (screen) {
    screen.el.remove();
    screenTiles.delete(e.trackId);
  }
  for (const tile of tiles.values()) {
    if (tile.cameraTrack !== e.trackId) continue;
    tile.stopFit?.();
    tile.stopFit = null;
    tile.cameraTrack = null;
    tile.video.srcObject = null;
    tile.video.hidden = true;
    delete tile.el.dataset.track;
  }
  render();
}

/** @param {Id} trackId */
function forgetScreen(trackId) {
  state.screens = state.screens.filter((s) => s.track !== trackId);
}

// --- render ------------------------------------------------------------------------------------

/** Brings the whole screen in line with the room model and the page state. */
function render() {
  if (state.phase !== 'meeting') return;
  const you = client.you?.id ?? null;
  // Participants who left lose their tiles; everyone present has one.
  for (const id of [...tiles.keys()]) if (!client.participants.has(id)) removeTile(id);
  state.order = state.order.filter((id) => client.participants.has(id));
  for (const id of client.participants.keys()) {
    noteJoined(id);
    ensureTile(id);
  }
  state.screens = state.screens.filter((s) => client.tracks.has(s.track) || screenTiles.has(s.track));

  const hands = client.hands;
  const stage = chooseStage({
    view: state.view,
    you,
    participants: state.order,
    screens: state.screens.filter((s) => screenTiles.has(s.track)),
    spotlight: client.settings.spotlight,
    pinned: state.pinned,
    activeSpeaker: state.activeSpeaker,
    lastSpeaker: state.lastSpeaker,
  });

  // Stage
  const stageEl = $('stage');
  /** @type {HTMLElement|null} */
  let onStage = null;
  if (stage?.kind === 'screen') {
    const s = /** @type {NonNullable<ReturnType<typeof screenTiles.get>>} */ (screenTiles.get(stage.track));
    onStage = s.el;
    const label = isYou(stage.participant) ? 'You are presenting' : `${nameOf(stage.participant)} is presenting`;
    /** @type {HTMLElement} */ (s.el.querySelector('.presenter')).textContent = label;
    s.el.setAttribute('aria-label', `Screen share: ${label}`);
  } else if (stage?.kind === 'participant') {
    onStage = tiles.get(stage.participant)?.el ?? null;
  }
  if (onStage && onStage.parentElement !== stageEl) stageEl.replaceChildren(onStage);
  if (!onStage) stageEl.replaceChildren();
  stageEl.hidden = !onStage;
  stageEl.dataset.kind = stage?.kind ?? '';
  stageEl.dataset.participant = stage ? String(stage.participant) : '';

  // Grid, in order; the staged tile is not in it.
  const grid = $('grid');
  const ordered = gridOrder(state.order, hands)
    .map((id) => tiles.get(id)?.el)
    .filter((el) => el && el !== onStage);
  ordered.forEach((el, i) => {
    if (grid.children[i] !== el) grid.insertBefore(/** @type {HTMLElement} */ (el), grid.children[i] ?? null);
  });
  // Screen shares not on the stage go to the grid's end.
  for (const s of screenTiles.values()) if (s.el !== onStage && s.el.parentElement !== grid) grid.append(s.el);
  // As square a grid as the count allows, wider than high (screens are landscape).
  const count = Math.max(1, grid.childElementCount);
  const cols = Math.ceil(Math.sqrt(count));
  grid.style.setProperty('--cols', String(cols));
  grid.style.setProperty('--rows', String(Math.ceil(count / cols)));

  // Tiles' captions and badges
  const handSet = new Set(hands);
  for (const [id, tile] of tiles) {
    const name = nameOf(id) + (isYou(id) ? ' (you)' : '');
    tile.name.textContent = name;
    tile.avatar.textContent = initials(nameOf(id));
    tile.avatar.hidden = !tile.video.hidden;
    tile.hand.hidden = !handSet.has(id);
    const micMuted = isYou(id) ? state.micMuted : participantMicMuted(id);
    tile.muted.hidden = !micMuted;
    const speaking = state.activeSpeaker === id;
    tile.el.classList.toggle('speaking', speaking);
    const pinned = state.pinned === id;
    tile.pin.textContent = pinned ? 'Unpin' : 'Pin';
    tile.pin.setAttribute('aria-pressed', String(pinned));
    tile.pin.setAttribute('aria-label', `${pinned ? 'Unpin' : 'Pin'} ${nameOf(id)}`);
    const facts = [name];
    if (speaking) facts.push('speaking');
    if (micMuted) facts.push('microphone muted');
    if (handSet.has(id)) facts.push('hand raised');
    if (client.settings.spotlight === id) facts.push('spotlighted');
    if (client.status.get(id) === 'reconnecting') facts.push('reconnecting');
    tile.el.classList.toggle('reconnecting', client.status.get(id) === 'reconnecting');
    tile.el.setAttribute('aria-label', facts.join(', '));
  }

  // Toolbar
  setPressed('mic', state.micMuted, state.micMuted ? 'Unmute' : 'Mute');
  button('mic').disabled = !local.mic;
  setPressed('cam', state.camOn, state.camOn ? 'Stop video' : 'Start video');
  setPressed('share', state.sharing, state.sharing ? 'Stop sharing' : 'Share screen');
  const handUp = you != null && handSet.has(you);
  setPressed('hand', handUp, handUp ? 'Lower hand' : 'Raise hand');
  setPressed('view-grid', state.view === 'grid');
  setPressed('view-speaker', state.view === 'speaker');
  setPressed('people', !$('people-panel').hidden);
  setPressed('chat', !$('chat-panel').hidden);
  button('end').hidden = !client.can('end');
  $('you-role').textContent = client.you?.role ?? '';
  const unread = $('chat-unread');
  unread.hidden = state.unread === 0;
  unread.textContent = String(state.unread);
  button('chat').setAttribute('aria-label', state.unread ? `Chat, ${state.unread} unread` : 'Chat');

  const dot = $('quality');
  dot.className = `dot ${state.quality}`;
  const qText = state.quality === 'unknown' ? 'measuring' : state.quality;
  dot.setAttribute('aria-label', `Connection quality: ${qText}`);
  dot.title = `Connection quality: ${qText}`;
  const rec = $('recommend');
  rec.hidden = !state.recommendation;
  rec.textContent = state.recommendation ?? '';

  $('room-controls').hidden = !client.can('lock');
  // A toggle the user just flipped keeps its state until the server answers.
  if (!togglesInFlight.has('lobby')) /** @type {HTMLInputElement} */ ($('lobby-toggle')).checked = client.settings.lobby;
  if (!togglesInFlight.has('locked')) /** @type {HTMLInputElement} */ ($('lock-toggle')).checked = client.settings.locked;

  renderPeople();
  renderChatTargets();
}

/** @param {string} id @param {boolean} pressed @param {string} [text] */
function setPressed(id, pressed, text) {
  const b = button(id);
  b.setAttribute('aria-pressed', String(pressed));
  if (text) b.textContent = text;
}

/** @param {Id} id whether the participant's microphone is muted (or not published) */
function participantMicMuted(id) {
  for (const t of client.tracks.values()) {
    if (t.participant === id && t.source === 'microphone') return Boolean(t.muted || /** @type {any} */ (t).hostMuted);
  }
  return true;
}

/** What the people list shows; it is rebuilt only when this changes. */
let peopleShown = '';

/** @param {Id} id whether a moderator muted the participant's microphone */
function participantHostMuted(id) {
  for (const t of client.tracks.values()) {
    if (t.participant === id && t.source === 'microphone') return Boolean(/** @type {any} */ (t).hostMuted);
  }
  return false;
}

/** The participant list, with the controls our role allows. */
function renderPeople() {
  const list = $('people-list');
  const count = client.participantCount || client.participants.size;
  $('people-count').textContent = `(${count})`;
  // A large room names only its interesting participants; the rest are a number.
  const others = othersLine(count, client.participants.size);
  $('people-others').textContent = others;
  $('people-others').hidden = others === '';
  // Rebuilding on every render (speaker changes come several times a second) would pull the
  // buttons from under the pointer and the keyboard focus.
  const shown = JSON.stringify([
    gridOrder(state.order, client.hands).map((id) => {
      const p = client.participants.get(id);
      return [id, p?.name, p?.identity, p?.role, participantMicMuted(id), participantHostMuted(id), client.status.get(id)];
    }),
    client.hands, client.you?.role, client.settings.spotlight, [...client.lobby.values()],
  ]);
  if (shown === peopleShown) return;
  peopleShown = shown;
  const handSet = new Set(client.hands);
  /** @type {HTMLElement[]} */
  const items = [];
  for (const id of gridOrder(state.order, client.hands)) {
    const p = client.participants.get(id);
    if (!p) continue;
    const li = document.createElement('li');
    li.dataset.participant = String(id);
    const who = document.createElement('div');
    who.className = 'who';
    const name = document.createElement('span');
    name.className = 'name';
    name.textContent = nameOf(id) + (isYou(id) ? ' (you)' : '')
      + (client.status.get(id) === 'reconnecting' ? ' (reconnecting)' : '');
    const role = document.createElement('span');
    role.className = 'role';
    role.textContent = p.role;
    who.append(name, role);
    if (handSet.has(id)) {
      const hand = document.createElement('span');
      hand.textContent = '✋';
      hand.setAttribute('role', 'img');
      hand.setAttribute('aria-label', 'hand raised');
      who.append(hand);
    }
    if (participantMicMuted(id)) {
      const m = document.createElement('span');
      m.textContent = '🔇';
      m.setAttribute('role', 'img');
      m.setAttribute('aria-label', 'microphone muted');
      who.append(m);
    }
    li.append(who);
    const actions = document.createElement('div');
    actions.className = 'actions';
    const who_ = nameOf(id);
    const add = (/** @type {string} */ label, /** @type {string} */ aria, /** @type {string} */ action, /** @type {() => Promise<unknown>} */ fn) => {
      const b = document.createElement('button');
      b.type = 'button';
      b.textContent = label;
      b.dataset.action = action;
      b.setAttribute('aria-label', aria);
      b.addEventListener('click', () => act(fn));
      actions.append(b);
    };
    if (!isYou(id)) {
      // Offered by our role; finer rules (a co-host cannot mute a host) are the server's, and
      // its refusal is shown.
      if (client.can('mute_others')) {
        if (participantHostMuted(id)) {
          add('Allow unmute', `Allow ${who_} to unmute`, 'allow-unmute', () => client.muteRemote(id, { muted: false }));
        } else {
          add('Mute', `Mute ${who_}`, 'mute', () => client.muteRemote(id));
        }
      }
      if (client.can('remove')) {
        add('Remove', `Remove ${who_} from the meeting`, 'remove', () => client.removeParticipant(id));
      }
      if (client.can('promote')) {
        const select = document.createElement('select');
        select.dataset.action = 'role';
        select.setAttribute('aria-label', `Role of ${who_}`);
        for (const r of ROLES) select.add(new Option(r, r));
        select.value = p.role;
        select.addEventListener('change', () => act(async () => {
          try {
            await client.setRole(id, select.value);
          } finally {
            render();
          }
        }));
        actions.append(select);
      }
    }
    if (client.can('spotlight')) {
      const on = client.settings.spotlight === id;
      add(on ? 'Remove spotlight' : 'Spotlight', `${on ? 'Remove spotlight from' : 'Spotlight'} ${who_}`,
        'spotlight', () => client.setSpotlight(on ? null : id));
    }
    if (handSet.has(id) && !isYou(id) && client.can('lower_hands')) {
      add('Lower hand', `Lower ${who_}'s hand`, 'lower-hand', () => client.lowerHand(id));
    }
    if (actions.childElementCount) li.append(actions);
    items.push(li);
  }
  // Keep focus on the same control across a re-render (keyboard users).
  const focused = document.activeElement;
  const focusKey = focused instanceof HTMLElement && list.contains(focused)
    ? [focused.closest('li')?.dataset.participant, focused.dataset.action] : null;
  list.replaceChildren(...items);
  if (focusKey) {
    /** @type {HTMLElement|null} */ (list.querySelector(`li[data-participant="${focusKey[0]}"] [data-action="${focusKey[1]}"]`))?.focus();
  }

  // Waiting room
  const lobby = [...client.lobby.values()];
  $('lobby-section').hidden = lobby.length === 0 || !client.can('admit');
  $('lobby-list').replaceChildren(...lobby.map((w) => {
    const li = document.createElement('li');
    li.dataset.participant = String(w.id);
    const n = w.name || w.identity || String(w.id);
    li.append(n);
    const actions = document.createElement('div');
    actions.className = 'actions';
    for (const [label, action, fn] of /** @type {const} */ ([
      ['Admit', 'admit', () => client.admit(w.id)],
      ['Deny', 'deny', () => client.deny(w.id)],
    ])) {
      const b = document.createElement('button');
      b.type = 'button';
      b.textContent = label;
      b.dataset.action = action;
      b.setAttribute('aria-label', `${label} ${n}`);
      b.addEventListener('click', () => act(fn));
      actions.append(b);
    }
    li.append(actions);
    return li;
  }));
}

function renderChatTargets() {
  const select = /** @type {HTMLSelectElement} */ ($('chat-to'));
  const want = [['', 'Everyone'], ...state.order.filter((id) => !isYou(id)).map((id) => [String(id), nameOf(id)])];
  const have = [...select.options].map((o) => [o.value, o.text]);
  if (JSON.stringify(want) === JSON.stringify(have)) return;
  const keep = select.value;
  select.replaceChildren(...want.map(([v, t]) => new Option(t, v)));
  select.value = want.some(([v]) => v === keep) ? keep : '';
}

// --- chat and reactions ------------------------------------------------------------------------

/** @param {import('./kcs-client.js').ChatMessage & {index: number}} m */
function appendChat(m) {
  const log = $('chat-log');
  const li = document.createElement('li');
  li.dataset.id = String(m.id);
  const from = document.createElement('span');
  from.className = 'from';
  from.textContent = isYou(m.from) ? 'You' : (m.fromName || nameOf(m.from));
  const time = document.createElement('time');
  const at = new Date(m.ts);
  time.dateTime = at.toISOString();
  time.textContent = at.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  const text = document.createElement('div');
  text.className = 'text';
  text.textContent = m.text;
  li.append(from, time);
  if (m.to != null) {
    const d = document.createElement('span');
    d.className = 'direct';
    d.textContent = isYou(m.to) ? ' (to you)' : ` (to ${nameOf(m.to)})`;
    li.append(d);
  }
  li.append(text);
  // In the room's order: a message can land before one already shown (our own message's ack
  // may come before the event of an earlier message of someone else).
  log.insertBefore(li, log.children[m.index] ?? null);
  log.scrollTop = log.scrollHeight;
  if ($('chat-panel').hidden && !isYou(m.from)) {
    state.unread += 1;
    render();
  }
}

/** @param {{participant: Id, emoji: string}} r */
function showReaction(r) {
  const span = document.createElement('span');
  span.textContent = r.emoji;
  const who = document.createElement('small');
  who.textContent = ` ${isYou(r.participant) ? 'You' : nameOf(r.participant)}`;
  span.append(who);
  $('reaction-layer').append(span);
  setTimeout(() => span.remove(), 4000);
}

// --- own media ---------------------------------------------------------------------------------

/** @param {boolean} muted */
async function setMicMuted(muted) {
  if (!local.mic) return;
  if (!muted && client.hostMuted('microphone')) {
    toast('A host muted you: raise your hand to ask to speak.');
    return;
  }
  try {
    await client.muteSelf('microphone', muted);
  } catch (err) {
    if (err instanceof KcsError && err.code === 'muted_by_host') {
      state.micMuted = true;
      render();
    }
    throw err;
  }
  state.micMuted = muted;
  render();
}

async function toggleCamera() {
  if (state.camOn) {
    await client.unpublish('camera');
    local.cam?.stop();
    local.cam = null;
    state.camOn = false;
    const tile = tiles.get(/** @type {Id} */ (client.you?.id));
    if (tile) {
      tile.video.srcObject = null;
      tile.video.hidden = true;
    }
  } else {
    const camId = /** @type {HTMLSelectElement} */ ($('camera-select')).value;
    const media = await navigator.mediaDevices.getUserMedia({
      video: { ...CAMERA_CONSTRAINTS, ...(camId ? { deviceId: camId } : {}) },
    });
    local.cam = media.getVideoTracks()[0];
    await client.publish(local.cam, { source: 'camera' });
    state.camOn = true;
    const tile = tiles.get(/** @type {Id} */ (client.you?.id));
    if (tile) {
      tile.video.srcObject = new MediaStream([local.cam]);
      tile.video.hidden = false;
    }
  }
  render();
}

async function toggleShare() {
  if (state.sharing) {
    await stopShare();
    return;
  }
  // Ask the server first: a role that may not share gets its answer before a browser prompt.
  if (client.version >= 2) await client.request('screenshare:start');
  const media = await navigator.mediaDevices.getDisplayMedia({ video: true, audio: false });
  const track = media.getVideoTracks()[0];
  local.screen = track;
  track.addEventListener('ended', () => act(stopShare)); // the browser's own "Stop sharing"
  const publication = await client.publish(track, { source: 'screen' });
  state.sharing = true;
  const id = publication.trackId ?? 'local-screen';
  screenTile(id, /** @type {Id} */ (client.you?.id), new MediaStream([track]));
  state.screens.push({ track: id, participant: /** @type {Id} */ (client.you?.id) });
  render();
}

async function stopShare() {
  if (!state.sharing) return;
  state.sharing = false;
  const publication = client.publications.get('screen');
  const id = publication?.trackId ?? 'local-screen';
  local.screen?.stop();
  local.screen = null;
  screenTiles.get(id)?.el.remove();
  screenTiles.delete(id);
  forgetScreen(id);
  render();
  if (publication) await client.unpublish('screen');
}

// --- connection quality ------------------------------------------------------------------------

/**
 * Measures round trip time and loss from both peer connections, shows the dot, and reports
 * the figures to the server (`stats:report`); a `stats:update` from the server, which also
 * knows its own RTCP view, overrides the local estimate.
 */
async function measureQuality() {
  const m = await client.connectionStats();
  const loss = lossBetween(state.lastCounters, { received: m.packetsReceived, lost: m.packetsLost });
  state.lastCounters = { received: m.packetsReceived, lost: m.packetsLost };
  if (!client.serverQuality) {
    state.quality = qualityOf({ rttMs: m.rttMs, loss });
    render();
  }
  if (client.version >= 2 && m.rttMs != null) {
    await client.reportStats({ rttMs: m.rttMs, loss: loss ?? 0, jitterMs: m.jitterMs, bitrate: m.bitrate });
  }
}

// --- wiring ------------------------------------------------------------------------------------

function wireClient() {
  client.on('track', onTrack);
  client.on('trackended', onTrackEnded);
  client.on('participant:joined', (/** @type {any} */ e) => {
    // Batched: `participant` is there only for a batch of one.
    for (const p of e.participants ?? [e.participant]) if (p?.id != null) noteJoined(p.id);
    render();
  });
  client.on('participant:count', () => render());
  client.on('participant:left', (/** @type {any} */ e) => {
    const id = idOf(e.participant);
    if (state.pinned === id) state.pinned = null;
    render();
  });
  client.on('track:published', (/** @type {any} */ e) => {
    noteTrack(e.track);
    render();
  });
  client.on('track:unpublished', (/** @type {any} */ e) => {
    forgetScreen(idOf(e.track));
    render();
  });
  client.on('track:muted', () => render());
  client.on('speaker:active', (/** @type {any} */ e) => {
    state.activeSpeaker = e.participant ?? null;
    if (e.participant != null && !isYou(e.participant)) state.lastSpeaker = e.participant;
    render();
  });
  client.on('room', () => render()); // any room-model change of the meeting features
  client.on('chat', appendChat);
  client.on('reaction', showReaction);
  client.on('quality', (/** @type {{quality: string, audioOnly: boolean}} */ q) => {
    state.quality = /** @type {any} */ (['good', 'fair', 'poor'].includes(q.quality) ? q.quality : 'unknown');
    state.recommendation = q.audioOnly ? 'Weak connection: turning video off may help' : null;
    render();
  });
  client.on('muted-by-host', (/** @type {{kind: string, by: Id|null}} */ e) => {
    if (e.kind === 'audio') state.micMuted = true;
    const what = e.kind === 'audio' ? 'microphone' : 'camera';
    toast(`${e.by != null ? nameOf(e.by) : 'A host'} muted your ${what}`);
    render();
  });
  client.on('unmute-allowed', () => toast('You may unmute again'));
  client.on('layout:update', (/** @type {any} */ e) => {
    if (e.layout === 'grid' || e.layout === 'speaker') state.view = e.layout;
    render();
  });
  client.on('invited', (/** @type {any} */ e) => toast(`You were invited to ${e.room}: ${e.link}`));
  client.on('reconnecting', () => { $('recommend').hidden = false; $('recommend').textContent = 'Reconnecting…'; });
  client.on('reconnected', () => { toast('Reconnected'); render(); });
  client.on('removed', (/** @type {{by: Id|null}} */ e) => ended(`You were removed from the meeting${e.by != null ? ` by ${nameOf(e.by)}` : ''}.`, 'You were removed'));
  client.on('lobby:denied', () => ended('The host did not let you in.', 'Not admitted'));
  client.on('room:close', (/** @type {any} */ e) => ended(`The meeting ended${e.reason === 'ended' ? ': a host ended it' : e.reason ? ` (${e.reason})` : ''}.`));
  client.on('error', showError);
  client.on('close', (/** @type {{code: number, reason: string}} */ e) => {
    if (!state.leaving) ended(`Disconnected (${e.code}${e.reason ? ` ${e.reason}` : ''}).`);
  });
  client.on('pc:state', (/** @type {{pc: string, state: string}} */ e) => {
    if (e.state === 'failed') showError(`${e.pc} connection failed`);
  });
}

function wireControls() {
  button('join-audio').addEventListener('click', () => startJoin(false));
  button('join-video').addEventListener('click', () => startJoin(true));
  for (const id of ['camera-select', 'mic-select', 'camera-off']) {
    $(id).addEventListener('change', () => startPreview().catch(showError));
  }
  button('waiting-leave').addEventListener('click', () => act(leave));
  button('mic').addEventListener('click', () => act(() => setMicMuted(!state.micMuted)));
  button('cam').addEventListener('click', () => act(toggleCamera));
  button('share').addEventListener('click', () => act(toggleShare));
  button('hand').addEventListener('click', () => act(() => {
    const up = client.you != null && client.hands.includes(client.you.id);
    return up ? client.lowerHand() : client.raiseHand();
  }));
  const reactions = $('reactions');
  for (const emoji of REACTIONS) {
    const b = document.createElement('button');
    b.type = 'button';
    b.textContent = emoji;
    b.dataset.reaction = emoji;
    b.setAttribute('aria-label', `React ${REACTION_NAMES[emoji] ?? emoji}`);
    b.addEventListener('click', () => act(() => client.react(emoji)));
    reactions.append(b);
  }
  button('view-grid').addEventListener('click', () => { state.view = 'grid'; render(); });
  button('view-speaker').addEventListener('click', () => { state.view = 'speaker'; render(); });
  button('people').addEventListener('click', () => togglePanel('people-panel'));
  button('chat').addEventListener('click', () => togglePanel('chat-panel'));
  button('leave').addEventListener('click', () => act(leave));
  for (const [id, key, set] of /** @type {const} */ ([
    ['lobby-toggle', 'lobby', (/** @type {boolean} */ on) => client.setLobby(on)],
    ['lock-toggle', 'locked', (/** @type {boolean} */ on) => client.setLocked(on)],
  ])) {
    const toggle = /** @type {HTMLInputElement} */ ($(id));
    toggle.addEventListener('change', () => {
      togglesInFlight.add(key);
      act(() => set(toggle.checked).finally(() => {
        togglesInFlight.delete(key);
        render();
      }));
    });
  }
  button('end').addEventListener('click', () => act(() => client.endForAll()));
  $('chat-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const input = /** @type {HTMLInputElement} */ ($('chat-input'));
    const text = input.value.trim();
    if (!text) return;
    const to = /** @type {HTMLSelectElement} */ ($('chat-to')).value;
    input.value = '';
    act(() => client.sendChat(text, to ? { to: client.participantId(to) } : {}));
  });
  document.addEventListener('keydown', (ev) => {
    if (!ev.altKey || ev.ctrlKey || ev.metaKey || state.phase !== 'meeting') return;
    /** @type {Record<string, string>} */
    const keys = { KeyA: 'mic', KeyV: 'cam', KeyS: 'share', KeyH: 'hand', KeyP: 'people', KeyC: 'chat' };
    const target = keys[ev.code];
    if (!target) return;
    ev.preventDefault();
    button(target).click();
  });
}

/** @param {string} id */
function togglePanel(id) {
  const panel = $(id);
  panel.hidden = !panel.hidden;
  if (id === 'chat-panel' && !panel.hidden) {
    state.unread = 0;
    $('chat-input').focus();
  } else if (!panel.hidden) {
    /** @type {HTMLElement|null} */ (panel.querySelector('h2'))?.setAttribute('tabindex', '-1');
    /** @type {HTMLElement|null} */ (panel.querySelector('h2'))?.focus();
  }
  render();
}

/** @param {boolean} withVideo */
function startJoin(withVideo) {
  joined = join(withVideo);
  joined.catch((err) => {
    showError(err);
    if (state.phase === 'prejoin' || state.phase === 'waiting') {
      showPhase('prejoin');
      $('prejoin-state').textContent = `Could not join: ${err.message ?? err}`;
      for (const id of ['join-audio', 'join-video']) button(id).disabled = false;
    }
  });
}

/** @type {Promise<void>|null} resolves once joined and published (for tests) */
let joined = null;

function main() {
  const room = params.get('room');
  for (const el of document.querySelectorAll('.room-name')) el.textContent = room ?? '';
  wireClient();
  wireControls();
  if (!room) {
    showError('add ?room=<name> to the address to join a room');
    for (const id of ['join-audio', 'join-video']) button(id).disabled = true;
    return;
  }
  document.title = `${room} · KCS meeting`;
  /** @type {HTMLInputElement} */ ($('name')).value = params.get('name') ?? localStorage.getItem('kcs-name') ?? '';
  startPreview().catch(showError);
}

main();

/** Statistics helpers for tests and debugging. */
const stats = {
  /** Inbound stats of every received track, with its publisher's identity. */
  async remote() {
    const out = [];
    for (const [trackId, remote] of client.remoteTracks) {
      out.push({
        trackId,
        participant: remote.participant,
        identity: client.participants.get(remote.participant)?.identity,
        source: remote.source,
        ...(await client.inboundStats(trackId)),
      });
    }
    return out;
  },
};

// @ts-ignore: the test hook
window.meet = {
  client, state, errors, stats, tiles, screenTiles,
  get joined() { return joined; },
};
