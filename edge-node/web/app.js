// @ts-check
/**
 * @file app.js — the basic page an edge serves at `/basic`: join a room at once with camera and
 * microphone, show one tile per remote video track, play remote audio. It exists for media-path
 * tests and debugging (a quality selector per tile); people meet on the meeting page at `/`
 * (meet.js).
 *
 * Query string: `room` (required), `token` (optional: without one the page asks the dev-only
 * `GET /dev/token?room=R`), `name`, `publish=0` (join as a viewer, no camera or microphone),
 * `fps` (camera frame rate, default 30), `simulcast=0` (send the camera as one 1280x720 stream, for
 * servers without simulcast).
 *
 * Each tile asks for the simulcast layer its rendered size needs (`auto`), or the layer picked
 * in its quality selector (low / mid / high). For tests, the page's state is on `window.kcs`:
 * `client`, `ready` (a promise), `errors`, `tiles`, `setQuality(trackId, quality)` and `stats`.
 */
import { KcsClient, maxSpatialForHeight } from './kcs-client.js';

/** Quality selector values → `maxSpatial`; `auto` follows the tile size. */
const QUALITY_LAYERS = { low: 0, mid: 1, high: 2 };

/** Camera capture: 1280x720 so that Chromium sends all three simulcast layers. */
const CAMERA_WIDTH = 1280;
const CAMERA_HEIGHT = 720;

const params = new URLSearchParams(location.search);
const client = new KcsClient();
/** @type {string[]} */
const errors = [];
/**
 * One tile per received video track.
 * @type {Map<import('./kcs-client.js').Id, {figure: HTMLElement, video: HTMLVideoElement,
 *   select: HTMLSelectElement, participant: import('./kcs-client.js').Id, stopFit: (() => void) | null}>}
 */
const tiles = new Map();
/** @type {Map<import('./kcs-client.js').Id, HTMLAudioElement>} */
const audios = new Map();

const $ = (/** @type {string} */ id) => /** @type {HTMLElement} */ (document.getElementById(id));

/** Shows an error on the page (and keeps it for tests). @param {unknown} err */
function showError(err) {
  const text = err instanceof Error ? err.message : String(err);
  errors.push(text);
  const box = $('errors');
  box.hidden = false;
  box.textContent = errors.join('\n');
  console.error('kcs:', err);
}

/** @param {string} text */
function setState(text) {
  $('state').textContent = text;
}

/** @param {import('./kcs-client.js').Id} participantId */
function participantLabel(participantId) {
  const p = client.participants.get(participantId);
  return p?.name || p?.identity || participantId;
}

/**
 * Applies a tile's quality selection: a fixed layer, or follow the tile's size.
 * @param {import('./kcs-client.js').Id} trackId
 * @param {string} quality `auto`, `low`, `mid` or `high`
 */
async function setQuality(trackId, quality) {
  const tile = tiles.get(trackId);
  if (!tile) throw new Error(`no tile for track ${trackId}`);
  tile.select.value = quality;
  tile.stopFit?.();
  tile.stopFit = null;
  if (quality === 'auto') {
    tile.stopFit = client.fitLayers(trackId, tile.video);
    return;
  }
  const layer = QUALITY_LAYERS[/** @type {keyof typeof QUALITY_LAYERS} */ (quality)];
  if (layer === undefined) throw new Error(`unknown quality ${quality}`);
  await client.setLayers(trackId, layer);
}

/** @param {import('./kcs-client.js').RemoteTrack} remote */
function addVideoTile(remote) {
  const figure = document.createElement('figure');
  figure.className = 'tile remote';
  figure.dataset.track = String(remote.trackId);
  figure.dataset.participant = String(remote.participant);
  const video = document.createElement('video');
  video.autoplay = true;
  video.muted = true;
  video.playsInline = true;
  video.srcObject = new MediaStream([remote.track]);
  const caption = document.createElement('figcaption');
  const label = document.createElement('span');
  label.textContent = `${participantLabel(remote.participant)} · ${remote.source}`;
  const select = document.createElement('select');
  select.className = 'quality';
  select.title = 'received quality';
  for (const q of ['auto', 'low', 'mid', 'high']) select.add(new Option(q, q));
  select.addEventListener('change', () => {
    setQuality(remote.trackId, select.value).catch(showError);
  });
  caption.append(label, select);
  figure.append(video, caption);
  $('tiles').append(figure);
  tiles.set(remote.trackId, {
    figure,
    video,
    select,
    participant: remote.participant,
    stopFit: null,
  });
  setQuality(remote.trackId, 'auto').catch(showError);
}

/** @param {import('./kcs-client.js').RemoteTrack} remote */
function addAudio(remote) {
  const audio = document.createElement('audio');
  audio.autoplay = true;
  audio.srcObject = new MediaStream([remote.track]);
  audio.dataset.track = String(remote.trackId);
  document.body.append(audio);
  audios.set(remote.trackId, audio);
  audio.play().catch(() => {
    // Autoplay with sound needs a user gesture in most browsers: play on the first click.
    document.addEventListener('click', () => audio.play().catch(showError), { once: true });
  });
}

/** @param {import('./kcs-client.js').Id} trackId */
function removeTrack(trackId) {
  const tile = tiles.get(trackId);
  if (tile) {
    tile.stopFit?.();
    tile.figure.remove();
    tiles.delete(trackId);
  }
  const audio = audios.get(trackId);
  if (audio) {
    audio.remove();
    audios.delete(trackId);
  }
}

/** @param {string} room @returns {Promise<string>} a dev token for the room */
async function devToken(room) {
  const res = await fetch(`/dev/token?room=${encodeURIComponent(room)}`);
  if (!res.ok) {
    const body = (await res.text()).slice(0, 200);
    throw new Error(`no token in the URL and GET /dev/token answered ${res.status}: ${body}`);
  }
  const body = await res.json();
  if (typeof body.token !== 'string') throw new Error('GET /dev/token returned no token');
  return body.token;
}

async function main() {
  const room = params.get('room');
  if (!room) throw new Error('add ?room=<name> to the address to join a room');
  $('room').textContent = room;
  const publish = params.get('publish') !== '0';
  const fps = Number(params.get('fps') ?? 30);
  const simulcast = params.get('simulcast') !== '0';

  client.on('track', (/** @type {import('./kcs-client.js').RemoteTrack} */ remote) => {
    if (remote.kind === 'video') addVideoTile(remote);
    else addAudio(remote);
  });
  client.on('trackended', (/** @type {{trackId: string}} */ e) => removeTrack(e.trackId));
  client.on('participant:left', () => {
    // Leaves come batched (protocol version 2): drop the tiles of whoever is gone.
    for (const [trackId, tile] of [...tiles]) {
      if (!client.participants.has(tile.participant)) removeTrack(trackId);
    }
  });
  client.on('error', showError);
  client.on('close', (/** @type {{code: number, reason: string}} */ e) => {
    setState(`disconnected (${e.code}${e.reason ? ` ${e.reason}` : ''})`);
  });
  client.on('room:close', (/** @type {any} */ e) => showError(`room closed: ${e.reason}`));
  client.on('pc:state', (/** @type {{pc: string, state: string}} */ e) => {
    if (e.state === 'failed') showError(`${e.pc} connection failed`);
  });

  /** @type {MediaStream|null} */
  let media = null;
  if (publish) {
    setState('camera');
    media = await navigator.mediaDevices.getUserMedia({
      video: { width: { ideal: CAMERA_WIDTH }, height: { ideal: CAMERA_HEIGHT }, frameRate: { ideal: fps } },
      audio: true,
    });
    /** @type {HTMLVideoElement} */ ($('local')).srcObject = media;
  } else {
    $('local-tile').remove();
  }

  setState('joining');
  const token = params.get('token') ?? (await devToken(room));
  const name = params.get('name') ?? undefined;
  await client.connect({ token, name });
  setState(`joined as ${client.you?.identity ?? client.you?.id ?? '?'}`);
  const leave = /** @type {HTMLButtonElement} */ ($('leave'));
  leave.disabled = false;
  leave.onclick = () => {
    leave.disabled = true;
    media?.getTracks().forEach((t) => t.stop());
    client.leave().then(() => setState('left'), showError);
  };

  if (media) {
    const [video] = media.getVideoTracks();
    const [audio] = media.getAudioTracks();
    /** @type {Array<{track: MediaStreamTrack, source: string, encodings?: RTCRtpEncodingParameters[]}>} */
    const items = [];
    if (video) items.push({ track: video, source: 'camera', ...(simulcast ? {} : { encodings: [{}] }) });
    if (audio) items.push({ track: audio, source: 'microphone' });
    await client.publishAll(items);
  }
  setState(`live as ${client.you?.identity ?? client.you?.id ?? '?'}`);
}

/** Statistics helpers for tests and debugging. */
const stats = {
  /** @param {import('./kcs-client.js').Id} trackId */
  inbound: (trackId) => client.inboundStats(trackId),
  /** @param {string} source */
  outbound: (source) => client.outboundStats(source),
  /** Inbound stats of every received video track, with its publisher. */
  remoteVideo: () => remoteStats('video'),
  /** Inbound stats of every received audio track, with its publisher. */
  remoteAudio: () => remoteStats('audio'),
};

/** @param {'audio'|'video'} kind */
async function remoteStats(kind) {
  const out = [];
  for (const [trackId, remote] of client.remoteTracks) {
    if (remote.kind !== kind) continue;
    out.push({
      trackId,
      participant: remote.participant,
      identity: client.participants.get(remote.participant)?.identity,
      source: remote.source,
      ...(await client.inboundStats(trackId)),
    });
  }
  return out;
}

const ready = main();
ready.catch((err) => {
  setState('error');
  showError(err);
});

// @ts-ignore: the test hook
window.kcs = { client, ready, errors, tiles, setQuality, stats, maxSpatialForHeight };
