// @ts-check
/**
 * @file kcs-client.js — the browser client library of a KCS edge (client protocol version 2,
 * docs/protocol.md).
 *
 * Why: every page that talks to an edge (the meeting page at `/`, the basic page, the tests)
 * needs the same signaling, the same two peer connections and the same room model; this module
 * is that one copy. It has no UI: a page renders from its room model and its events.
 *
 * How it works:
 * - One WebSocket to `/ws`. Every request carries a fresh `id` and gets exactly one reply, an
 *   `ack` (the promise resolves with it) or an `error` (the promise rejects with a
 *   {@link KcsError} whose `.code` is the server's code); a request with no reply within its
 *   timeout rejects with code `timeout`, and all requests in flight reject with `closed` when the
 *   socket closes.
 * - A *publisher* RTCPeerConnection: the client offers. Each {@link KcsClient#publish} adds a
 *   send-only transceiver (the camera with three simulcast encodings, lowest first: our
 *   convention) and renegotiates: `produce` carries the offer and `tracks: [{mid, source}]` of
 *   every track being published; the ack carries the answer and the server's track ids.
 * - A *subscriber* RTCPeerConnection: the server offers (`sdp:offer` events, each with a
 *   `revision` and the `tracks` its m-lines carry), the client answers with `sdp:answer` of the
 *   same revision. Offers are handled one at a time in arrival order. After each, the client
 *   compares the mid → track binding with the previous one and emits `track` for each new
 *   binding and `trackended` for each one that went away, so an application never reads SDP.
 * - The room model: participants, tracks (with mute state), the raised-hand queue, chat in the
 *   room's one order, settings (lock, lobby, layout, spotlight), the lobby (for moderators).
 *   Server events update it first and are then re-emitted by their `type`; a gap in the room's
 *   `seq` emits `seq-gap`. Changes of the meeting features also emit `room` so a page can
 *   re-render from the model.
 * - Reconnect: when the socket drops while joined (not after a leave, a removal or the end of
 *   the meeting, nor when the server closed it with 1000 or 1008), the client opens a new one
 *   and resumes with `reconnect:attempt`, the latest resume token and `lastSeq` (the last room
 *   event it processed), for up to {@link RESUME_WINDOW_MS}; the peer connections stay as they
 *   are (the server keeps its side of them). The events missed meanwhile arrive after the ack,
 *   in order, and update the room model like any others (a repeated chat message is dropped
 *   by its id).
 *
 * The edge is ICE-lite and puts all its candidates in its SDP, so this client never trickles
 * candidates: its own are found by the edge as peer-reflexive ones from the connectivity checks.
 *
 * It has no dependencies and no build step (a plain ES module).
 *
 * @example
 *   const client = new KcsClient();
 *   client.on('track', ({ track, info }) => attach(track, info));
 *   client.on('chat', (message) => show(message));
 *   await client.connect({ url: 'wss://edge.example/ws', token });
 *   if (client.waiting) await client.once('room:joined'); // the lobby is on: a host admits us
 *   const media = await navigator.mediaDevices.getUserMedia({ video: true, audio: true });
 *   await client.publishAll([
 *     { track: media.getVideoTracks()[0], source: 'camera' },
 *     { track: media.getAudioTracks()[0], source: 'microphone' },
 *   ]);
 *   await client.sendChat('hello');
 */

/** Protocol version this client speaks (the `hello` request). */
export const PROTOCOL_VERSION = 2;

/**
 * Versions this client can fall back to, newest first: an edge of version 1 answers `hello`
 * 2 with `unsupported_version` and keeps the socket open, and version 1 has all the media
 * (none of the meeting features: their requests get `unknown_type`).
 */
export const SUPPORTED_VERSIONS = Object.freeze([2, 1]);

/**
 * Default reply timeout of a request. An edge answers in milliseconds; an SDP negotiation can
 * take the server a few hundred ms on a loaded machine, so 10 s only catches a dead server.
 */
export const DEFAULT_TIMEOUT_MS = 10_000;

/**
 * Camera simulcast encodings, lowest first (our convention: rid `q` is layer 0). The bitrates
 * are what a 320x180 / 640x360 / 1280x720 VP8 layer needs for a talking head.
 * @type {ReadonlyArray<Readonly<RTCRtpEncodingParameters>>}
 */
export const CAMERA_ENCODINGS = Object.freeze([
  Object.freeze({ rid: 'q', scaleResolutionDownBy: 4, maxBitrate: 150_000 }),
  Object.freeze({ rid: 'h', scaleResolutionDownBy: 2, maxBitrate: 500_000 }),
  Object.freeze({ rid: 'f', maxBitrate: 1_500_000 }),
]);

/** Sources a published track can have (the protocol's `source` field). */
export const SOURCES = Object.freeze(['microphone', 'camera', 'screen', 'screen-audio']);

/** Emoji a `reaction:send` may carry (the server refuses others with `bad_request`). */
export const REACTIONS = Object.freeze(['👍', '❤️', '😂', '😮', '👏', '🎉']);

/** Roles, most powerful first. */
export const ROLES = Object.freeze(['host', 'co-host', 'presenter', 'attendee', 'viewer']);

/**
 * What each role may do: the protocol's permission matrix (docs/protocol.md, "Roles and
 * permissions"). The server enforces it; a page reads it only to offer the controls a user may
 * use. Finer rules (a co-host cannot mute a host, nobody targets themselves) stay with the
 * server, whose refusal is the answer.
 * @type {Readonly<Record<string, ReadonlyArray<string>>>}
 */
export const PERMISSIONS = Object.freeze({
  host: Object.freeze(['publish', 'share', 'chat', 'mute_others', 'remove', 'promote', 'admit',
    'lock', 'lower_hands', 'layout', 'spotlight', 'add', 'end', 'stream']),
  'co-host': Object.freeze(['publish', 'share', 'chat', 'mute_others', 'remove', 'admit', 'lock',
    'lower_hands', 'layout', 'spotlight', 'add', 'stream']),
  presenter: Object.freeze(['publish', 'share', 'chat']),
  attendee: Object.freeze(['publish', 'chat']),
  viewer: Object.freeze(['chat']),
});

/**
 * How long the server keeps a participant whose socket dropped: a resume after this fails
 * with `resume_invalid`, so the client stops trying.
 */
export const RESUME_WINDOW_MS = 30_000;

/** Pause between resume attempts: quick enough for a blip, slow enough not to spin. */
const RESUME_RETRY_MS = 1_000;

/**
 * Highest simulcast layer worth receiving for a tile rendered `height` CSS pixels high (times
 * the device pixel ratio when the caller wants device pixels). The thresholds are the heights
 * of our layers: 180 (q), 360 (h), 720 (f); a tile never needs more than the next layer up.
 * @param {number} height rendered height in pixels
 * @returns {0|1|2} the `maxSpatial` to ask for
 */
export function maxSpatialForHeight(height) {
  if (height <= 180) return 0;
  if (height <= 360) return 1;
  return 2;
}

/** An error reply of the server (or a local failure) with a machine-readable `code`. */
export class KcsError extends Error {
  /**
   * @param {string} code protocol error code (`token_invalid`, `sdp_invalid`, ...) or a local
   *   one: `timeout` (no reply in time), `closed` (socket closed), `not_connected`,
   *   `protocol` (the server sent something this client cannot read)
   * @param {string} message human-readable text
   * @param {string} [requestType] type of the request that failed, when there was one
   */
  constructor(code, message, requestType) {
    super(requestType ? `${requestType}: ${code}: ${message}` : `${code}: ${message}`);
    this.name = 'KcsError';
    this.code = code;
    this.requestType = requestType;
  }
}

/**
 * A minimal event emitter: `on` returns the function that removes the listener. A listener that
 * throws does not stop the others (the error is reported on the console).
 */
export class Emitter {
  constructor() {
    /** @type {Map<string, Set<Function>>} */
    this._listeners = new Map();
  }

  /**
   * @param {string} type event type; `*` receives every event as `(type, payload)`
   * @param {Function} fn listener
   * @returns {() => void} removes the listener
   */
  on(type, fn) {
    let set = this._listeners.get(type);
    if (!set) this._listeners.set(type, (set = new Set()));
    set.add(fn);
    return () => this.off(type, fn);
  }

  /** @param {string} type @param {Function} fn */
  off(type, fn) {
    this._listeners.get(type)?.delete(fn);
  }

  /**
   * Resolves with the next event of `type` (optionally the next one `filter` accepts).
   * @param {string} type
   * @param {(payload: any) => boolean} [filter]
   * @param {number} [timeoutMs] rejects with a `timeout` KcsError after this long
   * @returns {Promise<any>}
   */
  once(type, filter, timeoutMs) {
    return new Promise((resolve, reject) => {
      /** @type {ReturnType<typeof setTimeout> | undefined} */
      let timer;
      const off = this.on(type, (/** @type {any} */ payload) => {
        if (filter && !filter(payload)) return;
        off();
        clearTimeout(timer);
        resolve(payload);
      });
      if (timeoutMs) {
        timer = setTimeout(() => {
          off();
          reject(new KcsError('timeout', `no ${type} event within ${timeoutMs} ms`));
        }, timeoutMs);
      }
    });
  }

  /** @param {string} type @param {any} [payload] */
  emit(type, payload) {
    for (const fn of [...(this._listeners.get(type) ?? [])]) {
      try {
        fn(payload);
      } catch (err) {
        console.error(`kcs: listener of ${type} threw`, err);
      }
    }
    for (const fn of [...(this._listeners.get('*') ?? [])]) {
      try {
        fn(type, payload);
      } catch (err) {
        console.error('kcs: wildcard listener threw', err);
      }
    }
  }
}

/**
 * @typedef {string|number} Id  a participant or track id: opaque, compared as given by the server
 */

/**
 * @typedef {object} Participant
 * @property {Id} id
 * @property {string} identity
 * @property {string} [name]
 * @property {string} role
 */

/**
 * @typedef {object} TrackInfo  a track published in the room (the protocol's `track` object)
 * @property {Id} id
 * @property {Id} participant participant id
 * @property {string} source `microphone`, `camera`, `screen` or `screen-audio`
 * @property {'audio'|'video'} kind
 * @property {string} [codec]
 * @property {number} [layers] simulcast layers the publisher sends
 * @property {boolean} [muted]
 */

/**
 * @typedef {object} RemoteTrack  payload of the `track` event
 * @property {MediaStreamTrack} track the received media
 * @property {Id} trackId the room's track id
 * @property {string} mid m-line of the subscriber PC carrying it
 * @property {Id} participant publisher's participant id
 * @property {string} source
 * @property {'audio'|'video'} kind
 * @property {TrackInfo|undefined} info the room's track info, when known
 * @property {RTCRtpReceiver} receiver
 */

/**
 * @typedef {object} LocalPublication  a track this client publishes
 * @property {string} source
 * @property {MediaStreamTrack} track
 * @property {RTCRtpTransceiver} transceiver
 * @property {Id|null} trackId the server's id, once `produce` was acked
 */

/**
 * @typedef {object} ChatMessage  a chat message in the room's one order
 * @property {number} id server-assigned, increasing in the room
 * @property {number} ts the server's time, Unix milliseconds
 * @property {Id} from sender's participant id
 * @property {string} [fromName]
 * @property {Id|null} to recipient of a direct message, else null
 * @property {string} text
 */

/**
 * @typedef {object} RoomSettings
 * @property {boolean} locked
 * @property {boolean} lobby
 * @property {'grid'|'speaker'} layout
 * @property {Id|null} spotlight
 * @property {boolean} streaming
 */

/**
 * @typedef {object} ConnectOptions
 * @property {string} [url] WebSocket URL; default `/ws` on the page's own host
 * @property {string} token join token for the room
 * @property {string} [name] display name
 * @property {boolean} [autoSubscribe] let the server subscribe us to every track (default true)
 * @property {RTCConfiguration} [rtcConfig] extra RTCPeerConnection settings
 * @property {number} [timeoutMs] per-request reply timeout
 */

/**
 * A connection to one room of a KCS edge.
 *
 * Events (listen with {@link Emitter#on}):
 * - every server event by its type (`participant:joined`, `participant:left`,
 *   `participant:count`, `role:update`, `track:published`, `track:muted`, `hand:raise`,
 *   `chat:receive`, `lobby:update`, `sdp:offer`, `speaker:active`, `room:close`, ...), payload
 *   the message, after the room model was updated;
 * - `room`: the room model changed (roster, roles, tracks, hands, settings, lobby);
 * - `chat` ({@link ChatMessage}): a chat message new to this client, with its position `index`
 *   in {@link KcsClient#chat} (messages are kept in the room's order, whatever order the ack
 *   and the event of one's own message come in);
 * - `reaction` (`{participant, emoji, counts}`);
 * - `muted-by-host` (`{kind, by}`): a moderator muted our `kind` (the local tracks of that kind
 *   are disabled too); `unmute-allowed` (`{kind, by}`): we may unmute again;
 * - `removed` (`{by}`): a moderator removed us (the server closes the socket);
 * - `lobby:denied`: we were not let in; `room:joined`: we were admitted from the lobby;
 * - `invited` (`{room, token, link, by, role}`): someone added us to a room;
 * - `quality` (`{quality, audioOnly, rtt, loss}`): the server's view of our connection;
 * - `track` ({@link RemoteTrack}): a remote track is now received;
 * - `trackended` (`{trackId, mid}`): it no longer is;
 * - `published` / `unpublished` ({@link LocalPublication});
 * - `seq-gap` (`{expected, got}`): a room event was missed;
 * - `reconnecting` (`{attempt}`), `reconnected` (the resume ack): the socket dropped and came
 *   back within the resume window;
 * - `error` ({@link KcsError}): a failure not tied to a caller's promise (an unsolicited
 *   server error, a failed subscriber negotiation);
 * - `close` (`{code, reason}`): the socket closed for good (no resume follows).
 */
export class KcsClient extends Emitter {
  constructor() {
    super();
    /** @type {WebSocket|null} */
    this.ws = null;
    /** @type {RTCPeerConnection|null} the publisher PC (we offer) */
    this.pubPc = null;
    /** @type {RTCPeerConnection|null} the subscriber PC (the edge offers) */
    this.subPc = null;
    /** @type {Participant|null} ourselves, from the join ack */
    this.you = null;
    /** @type {string|null} */
    this.room = null;
    /** @type {Map<Id, Participant>} everyone in the room, us included */
    this.participants = new Map();
    /** @type {Map<Id, TrackInfo>} every track published in the room */
    this.tracks = new Map();
    /** @type {Map<string, LocalPublication>} our publications by source */
    this.publications = new Map();
    /** @type {Map<Id, RemoteTrack>} received tracks by the room's track id */
    this.remoteTracks = new Map();
    /** @type {number|null} last room event sequence number seen */
    this.seq = null;
    /** @type {number} highest `sdp:offer` revision answered */
    this.subRevision = 0;
    /** @type {number} the protocol version agreed with `hello` */
    this.version = PROTOCOL_VERSION;
    /** @type {boolean} joined, but waiting in the lobby for a moderator */
    this.waiting = false;
    /** @type {number} participants in the room (the roster may be paged: see members()) */
    this.participantCount = 0;
    /**
     * @type {'full'|'interesting'} how the room reports presence: `full` lists every join and
     * leave (the count follows them); `interesting` (a large room, for good) lists only hosts,
     * presenters, publishers and raised hands, and `participant:count` carries the size.
     */
    this.presence = 'full';
    /** @type {Id[]} raised hands, oldest first */
    this.hands = [];
    /** @type {ChatMessage[]} chat messages we may see, in the room's order (by id) */
    this.chat = [];
    /** @type {RoomSettings} */
    this.settings = { locked: false, lobby: false, layout: 'grid', spotlight: null, streaming: false };
    /** @type {Map<Id, Participant>} participants waiting in the lobby (moderators only) */
    this.lobby = new Map();
    /** @type {Map<Id, string>} connection status of participants: `reconnecting` while away */
    this.status = new Map();
    /** @type {{quality: string, audioOnly: boolean, rtt?: number, loss?: number}|null} the
     * server's last `stats:update` */
    this.serverQuality = null;
    /** @type {string|null} token of the last join, for `reconnect:attempt` */
    this.resumeToken = null;

    this._nextId = 1;
    /** @type {Map<number, {resolve: Function, reject: Function, timer: any, type: string}>} */
    this._pending = new Map();
    /** @type {Map<string, Id>} subscriber mid → track id */
    this._midToTrack = new Map();
    /** Serializes publisher negotiations. */
    this._pubChain = Promise.resolve();
    /** Serializes subscriber negotiations (offers in arrival order). */
    this._subChain = Promise.resolve();
    this._timeoutMs = DEFAULT_TIMEOUT_MS;
    /** @type {RTCConfiguration} */
    this._rtcConfig = {};
    /** @type {string|null} the socket's URL, for resuming */
    this._url = null;
    /** Set when the socket must not be resumed: we left, were removed or the room closed. */
    this._final = false;
    /** Set while `_resume` is trying: closes of its sockets are its business. */
    this._resuming = false;
  }

  /** @returns {Id|null} our participant id */
  get id() {
    return this.you?.id ?? null;
  }

  /**
   * Whether our role allows `action` (a key of {@link PERMISSIONS}: `mute_others`, `remove`,
   * `promote`, `admit`, `spotlight`, `end`, `share`...). For offering controls only: the server
   * decides.
   * @param {string} action
   */
  can(action) {
    const role = this.you?.role;
    return role !== undefined && (PERMISSIONS[role] ?? []).includes(action);
  }

  /**
   * The participant whose id prints as `text` (ids from HTML attributes are strings).
   * @param {string} text
   * @returns {Id|undefined}
   */
  participantId(text) {
    for (const id of this.participants.keys()) if (String(id) === text) return id;
    return undefined;
  }

  /**
   * Whether a moderator muted our publication of `source` (we may not unmute it).
   * @param {string} source
   */
  hostMuted(source) {
    const trackId = this.publications.get(source)?.trackId;
    return trackId != null && Boolean(/** @type {any} */ (this.tracks.get(trackId))?.hostMuted);
  }

  /** @returns {boolean} whether the signaling socket is open */
  get connected() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  /**
   * Opens the socket, says `hello` and joins the room the token is for.
   * @param {ConnectOptions} opts
   * @returns {Promise<any>} the `room:join` ack (`room`, `you`, `participants`, `tracks`, `seq`)
   */
  async connect(opts) {
    if (this.ws) throw new KcsError('already_connected', 'connect() was already called');
    this._timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this._rtcConfig = opts.rtcConfig ?? {};
    this._url = opts.url ?? defaultWsUrl();
    await this._openSocket(this._url);
    await this._hello();
    /** @type {Record<string, any>} */
    const join = { token: opts.token, autoSubscribe: opts.autoSubscribe ?? true };
    if (opts.name) join.name = opts.name;
    const ack = await this.request('room:join', join);
    if (ack.waiting === true) {
      this.waiting = true;
      this.room = ack.room ?? null;
      this.you = ack.you ?? null;
      return ack;
    }
    this._applyJoin(ack);
    return ack;
  }

  /** Says `hello` with the newest version the server accepts. */
  async _hello() {
    for (const version of SUPPORTED_VERSIONS) {
      try {
        await this.request('hello', { version });
        this.version = version;
        return;
      } catch (err) {
        if (/** @type {KcsError} */ (err).code !== 'unsupported_version' || version === SUPPORTED_VERSIONS.at(-1)) throw err;
      }
    }
  }

  /**
   * Opens the signaling socket and waits until it is open.
   * @param {string} url
   */
  async _openSocket(url) {
    const ws = new WebSocket(url);
    this.ws = ws;
    ws.onmessage = (ev) => {
      if (this.ws === ws) this._onMessage(ev.data);
    };
    ws.onclose = (ev) => {
      if (this.ws === ws) this._onClose(ev.code, ev.reason);
    };
    await new Promise((resolve, reject) => {
      ws.onopen = resolve;
      ws.onerror = () => reject(new KcsError('closed', `cannot open ${url}`));
    });
    ws.onerror = null;
  }

  /**
   * Takes the room state of a join, resume or admission (`room:join` ack, `reconnect:attempt`
   * ack, `room:joined` event) into the model.
   * @param {any} ack
   */
  _applyJoin(ack) {
    this.waiting = false;
    this.room = ack.room ?? this.room;
    this.you = ack.you ?? this.you;
    this.seq = typeof ack.seq === 'number' ? ack.seq : null;
    this.resumeToken = typeof ack.resumeToken === 'string' ? ack.resumeToken : null;
    this.participants.clear();
    for (const p of ack.participants ?? []) this.participants.set(p.id, p);
    if (this.you) this.participants.set(this.you.id, this.you);
    this.participantCount = typeof ack.participantCount === 'number'
      ? ack.participantCount : this.participants.size;
    this.presence = ack.presence === 'interesting' ? 'interesting' : 'full';
    this.tracks.clear();
    for (const t of ack.tracks ?? []) this.tracks.set(t.id, t);
    this.hands = Array.isArray(ack.hands) ? [...ack.hands] : [];
    if (ack.settings && typeof ack.settings === 'object') this.settings = { ...this.settings, ...ack.settings };
    this.lobby.clear();
    for (const w of ack.lobby ?? []) this.lobby.set(w.id, w);
    for (const m of ack.chat ?? []) this._addChat(m);
    this.emit('room');
  }

  /**
   * Sends one request and waits for its reply.
   * @param {string} type request type
   * @param {Record<string, any>} [fields]
   * @param {{timeoutMs?: number}} [opts]
   * @returns {Promise<any>} the ack (without `type` and `id`)
   * @throws {KcsError} the server's error, or `timeout` / `closed` / `not_connected`
   */
  request(type, fields = {}, opts = {}) {
    if (!this.connected) {
      return Promise.reject(new KcsError('not_connected', 'socket is not open', type));
    }
    const id = this._nextId++;
    const timeoutMs = opts.timeoutMs ?? this._timeoutMs;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new KcsError('timeout', `no reply within ${timeoutMs} ms`, type));
      }, timeoutMs);
      this._pending.set(id, { resolve, reject, timer, type });
      /** @type {WebSocket} */ (this.ws).send(JSON.stringify({ ...fields, id, type }));
    });
  }

  // --- publishing ---------------------------------------------------------------------------

  /**
   * Publishes a local track and renegotiates the publisher PC.
   * @param {MediaStreamTrack} track
   * @param {{source: string, encodings?: ReadonlyArray<RTCRtpEncodingParameters>}} opts `source`
   *   is one of {@link SOURCES}; `encodings` defaults to {@link CAMERA_ENCODINGS} for the camera
   *   and to a single encoding otherwise
   * @returns {Promise<LocalPublication>} with the server's `trackId`
   */
  async publish(track, opts) {
    const [publication] = await this.publishAll([{ track, ...opts }]);
    return publication;
  }

  /**
   * Publishes several tracks in one negotiation of the publisher PC (one `produce`): joining
   * with camera and microphone costs one round trip, not two.
   * @param {Array<{track: MediaStreamTrack, source: string,
   *   encodings?: ReadonlyArray<RTCRtpEncodingParameters>}>} items
   * @returns {Promise<LocalPublication[]>} in the order given, each with the server's `trackId`
   */
  publishAll(items) {
    for (const { source } of items) {
      if (!SOURCES.includes(source)) {
        return Promise.reject(new KcsError('bad_request', `unknown source ${source}`, 'produce'));
      }
    }
    return this._queuePub(async () => {
      const sources = new Set();
      for (const { source } of items) {
        if (this.publications.has(source) || sources.has(source)) {
          throw new KcsError('source_in_use', `${source} is already published`, 'produce');
        }
        sources.add(source);
      }
      const pc = this._publisherPc();
      /** @type {LocalPublication[]} */
      const added = items.map(({ track, source, encodings }) => {
        /** @type {RTCRtpTransceiverInit} */
        const init = { direction: 'sendonly' };
        const chosen = encodings ?? (source === 'camera' ? CAMERA_ENCODINGS : undefined);
        if (chosen) init.sendEncodings = chosen.map((e) => ({ ...e }));
        const transceiver = pc.addTransceiver(track, init);
        const publication = { source, track, transceiver, trackId: null };
        this.publications.set(source, publication);
        return publication;
      });
      try {
        await this._negotiatePublisher();
      } catch (err) {
        for (const p of added) {
          this.publications.delete(p.source);
          p.transceiver.direction = 'inactive';
          p.transceiver.sender.replaceTrack(null).catch(() => {});
        }
        throw err;
      }
      for (const p of added) this.emit('published', p);
      return added;
    });
  }

  /**
   * Stops publishing `source`: `media:unpublish` (forwarding stops at once), then the m-line
   * goes inactive in a renegotiation. The local MediaStreamTrack is left to the caller.
   * @param {string} source
   */
  unpublish(source) {
    return this._queuePub(async () => {
      const publication = this.publications.get(source);
      if (!publication) throw new KcsError('no_such_track', `${source} is not published`);
      this.publications.delete(source);
      if (publication.trackId) {
        await this.request('media:unpublish', { track: publication.trackId });
      }
      await publication.transceiver.sender.replaceTrack(null);
      publication.transceiver.direction = 'inactive';
      await this._negotiatePublisher();
      this.emit('unpublished', publication);
    });
  }

  /** @param {MediaStreamTrack} track */
  publishCamera(track) {
    return this.publish(track, { source: 'camera' });
  }

  /** @param {MediaStreamTrack} track */
  publishMicrophone(track) {
    return this.publish(track, { source: 'microphone' });
  }

  /** @param {MediaStreamTrack} track */
  publishScreen(track) {
    return this.publish(track, { source: 'screen' });
  }

  // --- subscribing --------------------------------------------------------------------------

  /** Subscribes to tracks (the server then sends an `sdp:offer`). @param {Id[]} trackIds */
  consume(trackIds) {
    return this.request('consume', { tracks: trackIds });
  }

  /** Unsubscribes from tracks. @param {Id[]} trackIds */
  consumerClose(trackIds) {
    return this.request('consumer:close', { tracks: trackIds });
  }

  /** Stops forwarding of a track to us without renegotiation. @param {Id} trackId */
  pause(trackId) {
    return this.request('consumer:pause', { track: trackId });
  }

  /** @param {Id} trackId */
  resume(trackId) {
    return this.request('consumer:resume', { track: trackId });
  }

  /**
   * Asks for at most simulcast layer `maxSpatial` (0 = lowest) of a video track.
   * @param {Id} trackId
   * @param {number} maxSpatial
   */
  setLayers(trackId, maxSpatial) {
    return this.request('consumer:layers', { track: trackId, maxSpatial });
  }

  /**
   * Keeps a track's layer preference fitted to the element that renders it: asks for
   * {@link maxSpatialForHeight} of its rendered height (in device pixels) now and whenever it
   * changes layer. Failures are emitted as `error`.
   * @param {Id} trackId
   * @param {HTMLElement} element the tile's video element
   * @returns {() => void} stops following the element
   */
  fitLayers(trackId, element) {
    let last = -1;
    const update = () => {
      const height = element.getBoundingClientRect().height * (globalThis.devicePixelRatio || 1);
      const layer = maxSpatialForHeight(height);
      if (layer === last) return;
      last = layer;
      this.setLayers(trackId, layer).catch((err) => this.emit('error', err));
    };
    const observer = new ResizeObserver(update);
    observer.observe(element);
    update();
    return () => observer.disconnect();
  }

  /**
   * Pins a participant for ourselves (`pin:user`): the edge forwards their video at the highest
   * layer our `consumer:layers` allows. Others are not told.
   * @param {Id|null} participant `null` unpins
   */
  pin(participant) {
    return this.request('pin:user', { participant });
  }

  // --- meeting features -----------------------------------------------------------------------

  /**
   * Mutes or unmutes one of our publications: the local track is disabled at once (nothing
   * leaves the microphone even before the server answers) and `mute:self` stops forwarding at
   * the SFU. Unmuting a track a moderator muted is refused with `muted_by_host`, and the track
   * stays disabled.
   * @param {string} source
   * @param {boolean} muted
   */
  async muteSelf(source, muted) {
    const publication = this.publications.get(source);
    if (!publication) throw new KcsError('no_such_track', `${source} is not published`, 'mute:self');
    if (muted) publication.track.enabled = false;
    if (publication.trackId != null) {
      await this.request('mute:self', { track: publication.trackId, muted });
    }
    publication.track.enabled = !muted;
  }

  /**
   * Asks the server to mute another participant's audio (or video) at the SFU
   * (`mute:remote`); `muted: false` lets them unmute again.
   * @param {Id} participant
   * @param {{kind?: 'audio'|'video', muted?: boolean}} [opts]
   */
  muteRemote(participant, opts = {}) {
    return this.request('mute:remote', { participant, kind: opts.kind ?? 'audio', muted: opts.muted ?? true });
  }

  /** Removes a participant from the room (`participant:remove`). @param {Id} participant */
  removeParticipant(participant) {
    return this.request('participant:remove', { participant });
  }

  /**
   * Changes a participant's role (`role:update`).
   * @param {Id} participant
   * @param {string} role one of {@link ROLES}
   */
  setRole(participant, role) {
    return this.request('role:update', { participant, role });
  }

  /** Lets a participant in from the lobby. @param {Id} participant */
  admit(participant) {
    return this.request('lobby:admit', { participant });
  }

  /** Turns a participant in the lobby away. @param {Id} participant */
  deny(participant) {
    return this.request('lobby:deny', { participant });
  }

  /**
   * Locks or unlocks the room (`room:lock`). Once acked the setting holds (the `room:update`
   * event that confirms it may come after the ack).
   * @param {boolean} locked
   */
  async setLocked(locked) {
    await this.request('room:lock', { locked });
    this.settings = { ...this.settings, locked };
    this.emit('room');
  }

  /** Turns the waiting room on or off (`room:lobby`), like {@link KcsClient#setLocked}. @param {boolean} enabled */
  async setLobby(enabled) {
    await this.request('room:lobby', { enabled });
    this.settings = { ...this.settings, lobby: enabled };
    this.emit('room');
  }

  /**
   * Spotlights a participant for everyone (`layout:update`), or ends the spotlight.
   * @param {Id|null} participant
   */
  setSpotlight(participant) {
    return this.request('layout:update', { spotlight: participant });
  }

  /** Sets the room's layout for everyone. @param {'grid'|'speaker'} layout */
  setRoomLayout(layout) {
    return this.request('layout:update', { layout });
  }

  /** Raises our hand. */
  raiseHand() {
    return this.request('hand:raise');
  }

  /**
   * Lowers our hand, or (moderators) another participant's.
   * @param {Id} [participant]
   */
  lowerHand(participant) {
    return this.request('hand:lower', participant === undefined ? {} : { participant });
  }

  /**
   * Sends a chat message to the room, or to one participant (`to`). Resolves with the message
   * as the server numbered it.
   * @param {string} text
   * @param {{to?: Id}} [opts]
   * @returns {Promise<ChatMessage>}
   */
  async sendChat(text, opts = {}) {
    const ack = await this.request('chat:send', opts.to === undefined ? { text } : { text, to: opts.to });
    // A room message also comes back as chat:receive; a direct one only in this ack.
    if (ack.message) this._addChat(ack.message);
    return ack.message;
  }

  /** Sends a reaction, one of {@link REACTIONS}. @param {string} emoji */
  react(emoji) {
    return this.request('reaction:send', { emoji });
  }

  /**
   * Invites an identity into the room without the lobby (`participant:add`); resolves with
   * its ready-to-use `token` and `link`.
   * @param {string} identity
   * @param {{role?: string, name?: string}} [opts]
   */
  addParticipant(identity, opts = {}) {
    return this.request('participant:add', { identity, ...opts });
  }

  /**
   * One page of the roster (`room:members`): participants with ids after `after`.
   * @param {{after?: Id, limit?: number}} [opts]
   * @returns {Promise<{participants: Participant[], next: Id|null, participantCount: number}>}
   */
  members(opts = {}) {
    return this.request('room:members', opts);
  }

  /** Ends the meeting for everyone (`room:close`, hosts only). */
  endForAll() {
    return this.request('room:close');
  }

  /**
   * Reports our view of the connection (`stats:report`); the server answers with
   * `stats:update` (the `quality` event).
   * @param {{rttMs: number, loss: number, jitterMs: number, bitrate: number}} m
   */
  reportStats(m) {
    const clean = (/** @type {number} */ x) => (Number.isFinite(x) && x >= 0 ? x : 0);
    return this.request('stats:report', {
      rtt: clean(m.rttMs), loss: Math.min(1, clean(m.loss)), jitter: clean(m.jitterMs), bitrate: clean(m.bitrate),
    });
  }

  // --- leaving ------------------------------------------------------------------------------

  /** Leaves the room (`room:leave`), then closes both PCs and the socket. */
  async leave() {
    this._final = true;
    try {
      if (this.connected) await this.request('room:leave');
    } finally {
      this.close();
    }
  }

  /** Closes everything at once, without telling the server. */
  close() {
    this._final = true;
    this.pubPc?.close();
    this.subPc?.close();
    this.pubPc = null;
    this.subPc = null;
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000, 'bye');
  }

  // --- statistics ---------------------------------------------------------------------------

  /**
   * The inbound-rtp statistics of a received track, or null when it is not received.
   * @param {Id} trackId
   * @returns {Promise<null|{kind: string, framesDecoded: number, frameWidth: number,
   *   frameHeight: number, framesPerSecond: number, packetsReceived: number,
   *   packetsLost: number, bytesReceived: number, jitter: number, totalSamplesReceived: number}>}
   */
  async inboundStats(trackId) {
    const remote = this.remoteTracks.get(trackId);
    if (!remote) return null;
    const report = await remote.receiver.getStats();
    for (const s of report.values()) {
      if (s.type !== 'inbound-rtp') continue;
      return {
        kind: s.kind,
        framesDecoded: s.framesDecoded ?? 0,
        frameWidth: s.frameWidth ?? 0,
        frameHeight: s.frameHeight ?? 0,
        framesPerSecond: s.framesPerSecond ?? 0,
        packetsReceived: s.packetsReceived ?? 0,
        packetsLost: s.packetsLost ?? 0,
        bytesReceived: s.bytesReceived ?? 0,
        jitter: s.jitter ?? 0,
        totalSamplesReceived: s.totalSamplesReceived ?? 0,
      };
    }
    return null;
  }

  /**
   * The outbound-rtp statistics of a published source, one entry per encoding (per `rid`).
   * @param {string} source
   * @returns {Promise<Array<{rid: string|undefined, frameWidth: number, frameHeight: number,
   *   bytesSent: number, packetsSent: number, qualityLimitationReason: string|undefined}>>}
   */
  async outboundStats(source) {
    const publication = this.publications.get(source);
    if (!publication) return [];
    const report = await publication.transceiver.sender.getStats();
    const out = [];
    for (const s of report.values()) {
      if (s.type !== 'outbound-rtp') continue;
      out.push({
        rid: s.rid,
        frameWidth: s.frameWidth ?? 0,
        frameHeight: s.frameHeight ?? 0,
        bytesSent: s.bytesSent ?? 0,
        packetsSent: s.packetsSent ?? 0,
        qualityLimitationReason: s.qualityLimitationReason,
      });
    }
    return out.sort((a, b) => (a.frameWidth ?? 0) - (b.frameWidth ?? 0));
  }

  /**
   * Our connection as the two peer connections see it: the round trip time of the selected
   * ICE candidate pair (the larger of the two PCs'), and cumulative received / lost packets,
   * jitter and the received bitrate estimate of the subscriber PC.
   * @returns {Promise<{rttMs: number|null, packetsReceived: number, packetsLost: number,
   *   jitterMs: number, bitrate: number}>}
   */
  async connectionStats() {
    /** @type {number|null} */
    let rttMs = null;
    let packetsReceived = 0;
    let packetsLost = 0;
    let jitterMs = 0;
    let bitrate = 0;
    for (const pc of [this.pubPc, this.subPc]) {
      if (!pc) continue;
      const report = await pc.getStats();
      for (const s of report.values()) {
        if (s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded'
          && typeof s.currentRoundTripTime === 'number') {
          rttMs = Math.max(rttMs ?? 0, s.currentRoundTripTime * 1000);
        }
        if (pc === this.subPc && s.type === 'candidate-pair' && s.nominated
          && typeof s.availableIncomingBitrate === 'number') {
          bitrate = s.availableIncomingBitrate;
        }
        if (pc === this.subPc && s.type === 'inbound-rtp') {
          packetsReceived += s.packetsReceived ?? 0;
          packetsLost += Math.max(0, s.packetsLost ?? 0);
          jitterMs = Math.max(jitterMs, (s.jitter ?? 0) * 1000);
        }
      }
    }
    return { rttMs, packetsReceived, packetsLost, jitterMs, bitrate };
  }

  // --- internals ----------------------------------------------------------------------------

  /** @param {() => Promise<any>} job */
  _queuePub(job) {
    const run = this._pubChain.then(job, job);
    this._pubChain = run.catch(() => {});
    return run;
  }

  _publisherPc() {
    if (!this.pubPc) {
      this.pubPc = new RTCPeerConnection({ bundlePolicy: 'max-bundle', ...this._rtcConfig });
      this.pubPc.onconnectionstatechange = () => {
        this.emit('pc:state', { pc: 'publisher', state: this.pubPc?.connectionState });
      };
    }
    return this.pubPc;
  }

  _subscriberPc() {
    if (!this.subPc) {
      this.subPc = new RTCPeerConnection({ bundlePolicy: 'max-bundle', ...this._rtcConfig });
      this.subPc.onconnectionstatechange = () => {
        this.emit('pc:state', { pc: 'subscriber', state: this.subPc?.connectionState });
      };
    }
    return this.subPc;
  }

  /** One offer/answer round of the publisher PC; must run inside `_queuePub`. */
  async _negotiatePublisher() {
    const pc = this._publisherPc();
    const offer = await pc.createOffer();
    await pc.setLocalDescription(offer);
    const tracks = [];
    for (const p of this.publications.values()) {
      // Every transceiver has its mid once the offer is applied locally.
      if (p.transceiver.mid !== null) tracks.push({ mid: p.transceiver.mid, source: p.source });
    }
    let ack;
    try {
      ack = await this.request('produce', { sdp: pc.localDescription?.sdp, tracks });
    } catch (err) {
      await pc.setLocalDescription({ type: 'rollback' }).catch(() => {});
      throw err;
    }
    if (typeof ack.sdp !== 'string') {
      await pc.setLocalDescription({ type: 'rollback' }).catch(() => {});
      throw new KcsError('protocol', 'produce ack has no sdp', 'produce');
    }
    await pc.setRemoteDescription({ type: 'answer', sdp: ack.sdp });
    for (const { mid, track } of ack.tracks ?? []) {
      for (const p of this.publications.values()) {
        if (p.transceiver.mid === mid) p.trackId = track;
      }
    }
  }

  /**
   * Answers one `sdp:offer` of the subscriber PC and updates the mid bindings.
   * @param {any} msg the event
   */
  async _answerOffer(msg) {
    if (typeof msg.revision !== 'number' || typeof msg.sdp !== 'string') {
      throw new KcsError('protocol', 'sdp:offer without revision or sdp');
    }
    if (msg.revision <= this.subRevision) return; // an older offer overtaken by a newer one
    const pc = this._subscriberPc();
    await pc.setRemoteDescription({ type: 'offer', sdp: msg.sdp });
    const answer = await pc.createAnswer();
    await pc.setLocalDescription(answer);
    try {
      await this.request('sdp:answer', { revision: msg.revision, sdp: answer.sdp });
    } catch (err) {
      // A newer offer is on its way; answering it will bring the state forward.
      if (/** @type {KcsError} */ (err).code !== 'stale_revision') throw err;
    }
    this.subRevision = msg.revision;
    this._rebind(pc, Array.isArray(msg.tracks) ? msg.tracks : []);
  }

  /**
   * Emits `trackended` for mids no longer bound to their track and `track` for new bindings.
   * @param {RTCPeerConnection} pc
   * @param {Array<{mid: string, track: Id, participant: Id, source: string,
   *   kind: 'audio'|'video'}>} entries
   */
  _rebind(pc, entries) {
    const next = new Map(entries.map((e) => [String(e.mid), e]));
    for (const [mid, trackId] of [...this._midToTrack]) {
      if (next.get(mid)?.track !== trackId) {
        this._midToTrack.delete(mid);
        this.remoteTracks.delete(trackId);
        this.emit('trackended', { trackId, mid });
      }
    }
    for (const [mid, e] of next) {
      if (this._midToTrack.get(mid) === e.track) continue;
      const transceiver = pc.getTransceivers().find((t) => t.mid === mid);
      if (!transceiver) {
        this.emit('error', new KcsError('protocol', `sdp:offer names mid ${mid} not in its SDP`));
        continue;
      }
      this._midToTrack.set(mid, e.track);
      /** @type {RemoteTrack} */
      const remote = {
        track: transceiver.receiver.track,
        trackId: e.track,
        mid,
        participant: e.participant,
        source: e.source,
        kind: e.kind,
        info: this.tracks.get(e.track),
        receiver: transceiver.receiver,
      };
      this.remoteTracks.set(e.track, remote);
      this.emit('track', remote);
    }
  }

  /** @param {any} data */
  _onMessage(data) {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      this.emit('error', new KcsError('protocol', 'server sent a frame that is not JSON'));
      return;
    }
    if (msg === null || typeof msg !== 'object' || typeof msg.type !== 'string') {
      this.emit('error', new KcsError('protocol', 'server sent a message without type'));
      return;
    }
    if ((msg.type === 'ack' || msg.type === 'error') && typeof msg.id === 'number') {
      const pending = this._pending.get(msg.id);
      if (!pending) return; // its timeout already fired
      this._pending.delete(msg.id);
      clearTimeout(pending.timer);
      if (msg.type === 'ack') {
        const { type: _t, id: _i, ...result } = msg;
        pending.resolve(result);
      } else {
        pending.reject(new KcsError(msg.code ?? 'internal', msg.message ?? '', pending.type));
      }
      return;
    }
    if (msg.type === 'error') {
      this.emit('error', new KcsError(msg.code ?? 'internal', msg.message ?? ''));
      return;
    }
    this._trackSeq(msg);
    this._applyEvent(msg);
    this.emit(msg.type, msg);
  }

  /** @param {any} msg */
  _trackSeq(msg) {
    if (typeof msg.seq !== 'number') return;
    if (this.seq !== null && msg.seq > this.seq + 1) {
      this.emit('seq-gap', { expected: this.seq + 1, got: msg.seq });
    }
    if (this.seq === null || msg.seq > this.seq) this.seq = msg.seq;
  }

  /** Updates the room model from a server event. @param {any} msg */
  _applyEvent(msg) {
    switch (msg.type) {
      case 'room:joined': // admitted from the lobby
        this._applyJoin(msg);
        break;
      case 'participant:joined': {
        // Batched (version 2: `participants`), or one (`participant`).
        const list = Array.isArray(msg.participants) ? msg.participants : [msg.participant];
        for (const p of list) {
          if (p?.id == null) continue;
          // In the interesting mode an entry may announce someone long here; only
          // `participant:count` moves the count.
          if (this.presence === 'full' && !this.participants.has(p.id)) this.participantCount += 1;
          this.participants.set(p.id, p);
          this.lobby.delete(p.id);
        }
        this.emit('room');
        break;
      }
      case 'participant:left': {
        const list = Array.isArray(msg.participants) ? msg.participants : [msg.participant];
        for (const ref of list) {
          const id = idOf(ref);
          if (id === undefined) continue;
          if (this.participants.delete(id) && this.presence === 'full') {
            this.participantCount = Math.max(0, this.participantCount - 1);
          }
          this.hands = this.hands.filter((h) => h !== id);
          this.status.delete(id);
          for (const [tid, t] of [...this.tracks]) if (t.participant === id) this.tracks.delete(tid);
        }
        this.emit('room');
        break;
      }
      case 'participant:count':
        // Only a large room sends it; the first one is how we learn the room turned large.
        if (typeof msg.participantCount === 'number' && msg.participantCount >= 0) {
          this.presence = 'interesting';
          this.participantCount = msg.participantCount;
          this.emit('room');
        }
        break;
      case 'participant:info':
        if (msg.participant != null && typeof msg.status === 'string') {
          this.status.set(msg.participant, msg.status);
          this.emit('room');
        }
        break;
      case 'role:update': {
        const p = this.participants.get(msg.participant);
        if (p) this.participants.set(msg.participant, { ...p, role: msg.role });
        if (this.you && msg.participant === this.you.id) this.you = { ...this.you, role: msg.role };
        this.emit('room');
        break;
      }
      case 'track:published':
        if (msg.track?.id != null) this.tracks.set(msg.track.id, msg.track);
        this.emit('room');
        break;
      case 'track:unpublished': {
        const id = idOf(msg.track);
        if (id !== undefined) this.tracks.delete(id);
        this.emit('room');
        break;
      }
      case 'track:muted': {
        const t = this.tracks.get(msg.track);
        if (t) {
          this.tracks.set(msg.track, {
            ...t, muted: Boolean(msg.muted), ...(msg.hostMuted !== undefined ? { hostMuted: Boolean(msg.hostMuted) } : {}),
          });
        }
        this.emit('room');
        break;
      }
      case 'hand:raise':
      case 'hand:lower':
        if (Array.isArray(msg.hands)) this.hands = [...msg.hands];
        this.emit('room');
        break;
      case 'chat:receive':
        if (msg.message) this._addChat(msg.message);
        break;
      case 'reaction:update':
        this.emit('reaction', { participant: msg.participant, emoji: msg.emoji, counts: msg.counts ?? {} });
        break;
      case 'layout:update':
        if (msg.layout === 'grid' || msg.layout === 'speaker') this.settings.layout = msg.layout;
        if (msg.spotlight !== undefined) this.settings.spotlight = msg.spotlight;
        this.emit('room');
        break;
      case 'room:update':
        if (msg.settings && typeof msg.settings === 'object') this.settings = { ...this.settings, ...msg.settings };
        this.emit('room');
        break;
      case 'room:restored':
        // The room was rebuilt on a new origin: its settings and hand queue replace ours.
        if (msg.settings && typeof msg.settings === 'object') this.settings = { ...this.settings, ...msg.settings };
        if (Array.isArray(msg.hands)) this.hands = [...msg.hands];
        this.emit('room');
        break;
      case 'lobby:update':
        this.lobby.clear();
        for (const w of msg.waiting ?? []) if (w?.id != null) this.lobby.set(w.id, w);
        this.emit('room');
        break;
      case 'lobby:denied':
      case 'room:close':
        this._final = true;
        break;
      case 'participant:remove':
        this._final = true;
        this.emit('removed', { by: msg.by ?? null });
        break;
      case 'mute:remote': {
        const kind = msg.kind === 'video' ? 'video' : 'audio';
        if (msg.muted !== false) {
          // The SFU has already stopped forwarding; stop sending too.
          for (const p of this.publications.values()) if (p.track.kind === kind) p.track.enabled = false;
          this.emit('muted-by-host', { kind, by: msg.by ?? null });
        } else {
          this.emit('unmute-allowed', { kind, by: msg.by ?? null });
        }
        break;
      }
      case 'participant:add':
        this.emit('invited', { room: msg.room, token: msg.token, link: msg.link, by: msg.by, role: msg.role });
        break;
      case 'stats:update':
        this.serverQuality = {
          quality: String(msg.quality), audioOnly: Boolean(msg.audioOnly), rtt: msg.rtt, loss: msg.loss,
        };
        this.emit('quality', this.serverQuality);
        break;
      case 'sdp:offer':
        this._subChain = this._subChain
          .then(() => this._answerOffer(msg))
          .catch((err) => this.emit('error', asKcsError(err, 'sdp:answer')));
        break;
      default:
        break;
    }
  }

  /**
   * Adds a chat message at its place in the room's order (by id), once; emits `chat` when it
   * is new.
   * @param {any} m
   */
  _addChat(m) {
    if (m === null || typeof m !== 'object' || typeof m.id !== 'number') return;
    let index = this.chat.length;
    while (index > 0 && this.chat[index - 1].id > m.id) index -= 1;
    if (index > 0 && this.chat[index - 1].id === m.id) return; // ack and event of one message
    /** @type {ChatMessage} */
    const message = {
      id: m.id, ts: Number(m.ts) || 0, from: m.from, fromName: m.fromName, to: m.to ?? null,
      text: String(m.text ?? ''),
    };
    this.chat.splice(index, 0, message);
    this.emit('chat', { ...message, index });
  }

  /** @param {number} code @param {string} reason */
  _onClose(code, reason) {
    for (const [id, pending] of this._pending) {
      clearTimeout(pending.timer);
      pending.reject(new KcsError('closed', `socket closed (${code} ${reason})`, pending.type));
      this._pending.delete(id);
    }
    if (this._resuming) return; // a failed attempt: _resume decides what is next
    // 1000: the server ended the session on purpose; 1008: closed for abuse. Anything else
    // (1006 network drop, 1001 going away, 1011/1012 server trouble) is worth a resume.
    if (!this._final && this.resumeToken && this._url && code !== 1000 && code !== 1008) {
      this._resume(code, reason);
      return;
    }
    this.emit('close', { code, reason });
  }

  /**
   * Tries `reconnect:attempt` on new sockets until it succeeds, the server says the token is
   * no longer valid, or the resume window has passed; then `close` is emitted.
   * @param {number} code @param {string} reason of the drop
   */
  async _resume(code, reason) {
    const deadline = Date.now() + RESUME_WINDOW_MS;
    this._resuming = true;
    for (let attempt = 1; Date.now() < deadline && !this._final; attempt++) {
      this.emit('reconnecting', { attempt });
      try {
        await this._openSocket(/** @type {string} */ (this._url));
        await this._hello();
        /** @type {Record<string, any>} */
        const req = { resumeToken: this.resumeToken };
        if (this.seq !== null) req.lastSeq = this.seq;
        const ack = await this.request('reconnect:attempt', req);
        this._resuming = false;
        // The ack names us and a fresh token; the room model stays, and the events we missed
        // (after lastSeq) follow in order and bring it up to date.
        this.you = ack.you ?? this.you;
        this.room = ack.room ?? this.room;
        if (typeof ack.resumeToken === 'string') this.resumeToken = ack.resumeToken;
        this.emit('reconnected', ack);
        return;
      } catch (err) {
        const e = asKcsError(err, 'reconnect:attempt');
        if (e.code === 'resume_invalid') break;
        if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000, 'retry');
        await new Promise((r) => setTimeout(r, RESUME_RETRY_MS));
      }
    }
    this._resuming = false;
    this.ws = null;
    this.emit('close', { code, reason });
  }
}

/**
 * The id of a reference that is either an id or an object with an `id` (events name
 * participants and tracks both ways).
 * @param {any} ref
 * @returns {Id|undefined}
 */
export function idOf(ref) {
  if (ref !== null && typeof ref === 'object') return ref.id;
  return ref ?? undefined;
}

/** @returns {string} `ws(s)://<this page's host>/ws` */
function defaultWsUrl() {
  const proto = globalThis.location?.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${proto}//${globalThis.location?.host}/ws`;
}

/** @param {any} err @param {string} requestType @returns {KcsError} */
function asKcsError(err, requestType) {
  if (err instanceof KcsError) return err;
  return new KcsError('internal', String(err?.message ?? err), requestType);
}
