// syncmesh JavaScript client: Sync Maps (maps of JSON items with live events) on a syncmesh
// node. One ES module, no dependencies; browsers and Node.js 20+. Types: syncmesh.d.ts.
//
// How it keeps its promises:
// - Operations on one key run one at a time, in call order (a per-key chain); listing and map
//   removal wait for every operation called before them, and later ones wait for them.
// - While the node is unreachable, operations wait (at most `maxQueue` of them) and go out in
//   order once it answers again. Only a failure to reach the node is retried this way; an
//   answer with an error rejects the operation.
// - Events come from the node's Server-Sent Events stream (read with fetch, so the token is a
//   header and Node.js needs nothing extra), resumed after the last event id seen, so each
//   event is delivered once and in order across reconnects.
// - `isLocal` is true exactly for changes made through this client object: the node says which
//   changes it made itself, and the client matches those against the revisions its own writes
//   returned (holding an event back while a write to the same key is in flight).
// - A write whose answer was lost (the connection dropped after sending it) may have taken
//   effect: before sending it again the client reads the item, and when it already holds what
//   the write asked for, takes that as the write's answer. So a `mutate` is not applied twice,
//   a `remove` that did remove resolves, and the write's event is local. (Another writer that
//   wrote exactly the same data meanwhile is indistinguishable from it.)

const API = "/v1/Services/default";

/** Client-side error codes (the node's own are the Sync Maps codes). */
export const ErrorCodes = Object.freeze({
  NO_PAGE: 20400,
  UNAUTHORIZED: 20003,
  QUEUE_FULL: 20429,
  SHUT_DOWN: 20499,
  BAD_ANSWER: 20502,
  MAP_NOT_FOUND: 54200,
  ITEM_NOT_FOUND: 54201,
  REVISION_MISMATCH: 54205,
  ITEM_EXISTS: 54208,
  NAME_TAKEN: 54301,
});

const SID = /^MP[0-9a-f]{32}$/;
/** A stream that has received nothing (not even a keep-alive, sent every 15 s) is dead. */
const STREAM_IDLE_MS = 45_000;
const PROBE_TIMEOUT_MS = 10_000;
const BACKOFF_MIN_MS = 200;
const BACKOFF_MAX_MS = 5_000;
/**
 * Revisions of this client's writes kept until their events arrive, over all keys (the
 * oldest forgotten first). Not per key: a stream that lags behind the answers (a buffering
 * proxy, a backlog) must not turn a burst of writes to one key into "not local" events.
 */
const OWN_REVISIONS = 100_000;
/** Longest a write waits for its own event before it resolves (a safety net: it always comes). */
const OWN_EVENT_WAIT_MS = 10_000;
/** Own events remembered as delivered before their write resolved. */
const OWN_SEEN = 1024;
/** How long `shutdown()` lets requests already sent finish. */
const SHUTDOWN_DRAIN_MS = 5_000;

/** A failed operation: the node's answer, or a failure of the client itself. */
export class SyncError extends Error {
  constructor(message, status = 0, code = 0) {
    super(message);
    this.name = "SyncError";
    this.status = status;
    this.code = code;
  }
}

/** The node could not be reached (no answer at all): the operation may be retried. */
class Unreachable extends Error {}

/** Minimal event emitter; a throwing handler is reported and does not stop delivery. */
class Emitter {
  #handlers = new Map();

  on(event, handler) {
    if (typeof handler !== "function") throw new TypeError("handler must be a function");
    if (!this.#handlers.has(event)) this.#handlers.set(event, []);
    this.#handlers.get(event).push({ handler, once: false });
    return this;
  }

  once(event, handler) {
    this.on(event, handler);
    const list = this.#handlers.get(event);
    list[list.length - 1].once = true;
    return this;
  }

  off(event, handler) {
    const list = this.#handlers.get(event);
    if (list) {
      const i = list.findIndex((h) => h.handler === handler);
      if (i >= 0) list.splice(i, 1);
    }
    return this;
  }

  addListener(event, handler) {
    return this.on(event, handler);
  }

  removeListener(event, handler) {
    return this.off(event, handler);
  }

  removeAllListeners(event) {
    if (event === undefined) this.#handlers.clear();
    else this.#handlers.delete(event);
    return this;
  }

  listenerCount(event) {
    return this.#handlers.get(event)?.length ?? 0;
  }

  emit(event, arg) {
    const list = this.#handlers.get(event);
    if (!list || list.length === 0) return false;
    for (const h of [...list]) {
      if (h.once) this.off(event, h.handler);
      try {
        h.handler(arg);
      } catch (e) {
        console.error(`syncmesh: a '${event}' handler threw`, e);
      }
    }
    return true;
  }
}

const date = (s) => (s ? new Date(s) : null);
const seg = (s) => encodeURIComponent(s);

function checkKey(key) {
  if (typeof key !== "string" || key.length === 0) {
    throw new SyncError("the key must be a non-empty string", 400, 54209);
  }
  // URL parsers drop such path segments, so no request could name them (the node refuses them).
  if (key === "." || key === "..") {
    throw new SyncError(`the key ${JSON.stringify(key)} is not allowed`, 400, 54209);
  }
}

function checkData(data) {
  if (data === null || typeof data !== "object" || Array.isArray(data)) {
    throw new SyncError("item data must be a JSON object", 400, 54206);
  }
}

/** Whether two JSON values are equal (object fields in any order). */
/** @internal Deep equality of JSON values (exported for the tests). */
export function sameJson(a, b) {
  if (a === b) return true;
  if (a === null || b === null || typeof a !== "object" || typeof b !== "object") return false;
  if (Array.isArray(a) !== Array.isArray(b)) return false;
  const ka = Object.keys(a);
  if (ka.length !== Object.keys(b).length) return false;
  return ka.every((k) => Object.prototype.hasOwnProperty.call(b, k) && sameJson(a[k], b[k]));
}

/** The answer a write whose answer was lost would have had, once it is known to have happened. */
const REMOVED = Object.freeze({ status: 204, ok: true, body: null, headers: null });

function ttlParams(metadata) {
  if (metadata && metadata.ttl !== undefined && metadata.ttl !== null) return { Ttl: metadata.ttl };
  return {};
}

/** One item of a map. `value` is the older SDK's name for `data`. */
export class SyncMapItem {
  constructor(fields) {
    this.key = fields.key;
    this.data = fields.data;
    this.revision = fields.revision;
    this.dateCreated = date(fields.dateCreated);
    this.dateUpdated = date(fields.dateUpdated);
    this.dateExpires = date(fields.dateExpires);
    this.createdBy = fields.createdBy ?? null;
  }

  get value() {
    return this.data;
  }

  /** @internal From the node's item resource. */
  static fromResource(r) {
    return new SyncMapItem({
      key: r.key,
      data: r.data,
      revision: r.revision,
      dateCreated: r.date_created,
      dateUpdated: r.date_updated,
      dateExpires: r.date_expires,
      createdBy: r.created_by,
    });
  }

  /** @internal From an item event of the node. */
  static fromEvent(e) {
    return new SyncMapItem({
      key: e.item_key,
      data: e.item_data,
      revision: e.item_revision,
      dateCreated: e.item_date_created ?? e.date_created,
      dateUpdated: e.item_date_updated ?? e.date_created,
      dateExpires: e.item_date_expires ?? null,
      createdBy: e.item_created_by ?? null,
    });
  }
}

/** One page of a listing. */
export class Paginator {
  #load;
  #prev;
  #next;

  /** @internal `load(pageToken)` fetches another page. */
  constructor(items, prevToken, nextToken, load) {
    this.items = items;
    this.#prev = prevToken;
    this.#next = nextToken;
    this.#load = load;
  }

  get hasNextPage() {
    return this.#next !== null;
  }

  get hasPrevPage() {
    return this.#prev !== null;
  }

  async nextPage() {
    if (this.#next === null) throw new SyncError("there is no next page", 400, ErrorCodes.NO_PAGE);
    return this.#load(this.#next);
  }

  async prevPage() {
    if (this.#prev === null) throw new SyncError("there is no previous page", 400, ErrorCodes.NO_PAGE);
    return this.#load(this.#prev);
  }
}

/** The page token in one of the node's page URLs, or null. */
/** @internal (exported for the tests) */
export function pageToken(url) {
  if (!url) return null;
  try {
    return new URL(url, "http://x").searchParams.get("PageToken");
  } catch {
    return null;
  }
}

function mapDescriptor(r) {
  return {
    sid: r.sid,
    uniqueName: r.unique_name ?? null,
    revision: r.revision,
    dateCreated: date(r.date_created),
    dateUpdated: date(r.date_updated),
    dateExpires: date(r.date_expires),
    createdBy: r.created_by,
  };
}

/** Incremental Server-Sent Events parser (the WHATWG rules this node's streams need). */
/** @internal (exported for the tests) */
export class SseParser {
  #buf = "";
  #data = [];
  #event = "";
  #id = null;

  /** Feeds text; returns the complete messages in it: `{event, data, id}` (`id` null if none). */
  push(text) {
    this.#buf += text;
    const out = [];
    for (;;) {
      const m = /\r\n|\r|\n/.exec(this.#buf);
      if (!m) break;
      // A lone \r at the very end may be the first half of \r\n: wait for more.
      if (m[0] === "\r" && m.index === this.#buf.length - 1) break;
      const line = this.#buf.slice(0, m.index);
      this.#buf = this.#buf.slice(m.index + m[0].length);
      if (line === "") {
        if (this.#data.length > 0 || this.#id !== null) {
          out.push({ event: this.#event || "message", data: this.#data.length ? this.#data.join("\n") : null, id: this.#id });
        }
        this.#data = [];
        this.#event = "";
        this.#id = null;
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") this.#data.push(value);
      else if (field === "event") this.#event = value;
      else if (field === "id" && !value.includes("\0")) this.#id = value;
    }
    return out;
  }
}

/**
 * What is shared by every SyncMap object of one map in one client: its event stream, the
 * per-key order of operations and the record of this client's own writes.
 * @internal
 */
class MapCore {
  constructor(client, resource) {
    this.client = client;
    this.sid = resource.sid;
    this.uniqueName = resource.unique_name ?? null;
    this.dateUpdated = date(resource.date_updated);
    this.dateExpires = date(resource.date_expires);
    this.views = new Set();
    this.removed = false;
    // Ordering of operations.
    this.chains = new Map(); // key -> tail promise of its chain
    this.barrier = Promise.resolve(); // the last map-wide operation
    // Locality of events.
    this.inflight = new Map(); // key -> writes sent and not answered
    this.mapWriteInflight = 0;
    this.ownRevisions = new Map(); // key -> revisions our writes returned, not yet seen
    this.ownRevisionCount = 0;
    this.ownRemovals = new Map(); // key -> acknowledged removals not yet seen
    this.ownMapRemoval = 0;
    this.held = []; // events waiting for their locality to be known, in order
    // A write resolves after its own event was delivered (as the hosted SDK does), so code
    // that awaits a write sees its handlers' effects. Tokens: "r:<revision>", "d:<key>", "m".
    this.ownWaiters = new Map(); // token -> {resolve, timer}
    this.ownSeen = new Set(); // tokens of own events delivered before anyone waited
    this.live = false; // the event stream is open
    // The stream.
    this.lastId = null;
    this.abort = null;
    this.stopped = false;
    this.ready = new Promise((resolve, reject) => {
      this.markReady = resolve;
      this.failReady = reject;
    });
    this.ready.catch(() => {});
    this.run();
  }

  // ---- ordering -------------------------------------------------------------------------

  /** Runs `fn` after every earlier operation on `key` and every earlier map-wide operation. */
  keyed(key, fn) {
    const release = this.client.enter();
    const prev = this.chains.get(key) ?? Promise.resolve();
    const p = Promise.all([prev, this.barrier]).then(fn);
    p.then(release, release);
    const tail = p.then(
      () => {},
      () => {},
    );
    this.chains.set(key, tail);
    tail.then(() => {
      if (this.chains.get(key) === tail) this.chains.delete(key);
    });
    return p;
  }

  /** Runs `fn` after every earlier operation; later operations wait for it. */
  mapWide(fn) {
    const release = this.client.enter();
    const before = [this.barrier, ...this.chains.values()];
    const p = Promise.all(before).then(fn);
    p.then(release, release);
    this.barrier = p.then(
      () => {},
      () => {},
    );
    return p;
  }

  // ---- writes and their locality --------------------------------------------------------

  /** Sends a write of `key` (null: of the map itself) and records what it did. */
  async write(key, method, path, opts) {
    const count = (d) => {
      if (key === null) this.mapWriteInflight += d;
      else {
        const n = (this.inflight.get(key) ?? 0) + d;
        if (n > 0) this.inflight.set(key, n);
        else this.inflight.delete(key);
      }
    };
    const res = await this.client.send(method, path, {
      ...opts,
      onSend: () => count(1),
      onSettled: (res) => {
        count(-1);
        if (res && res.ok && key !== null) {
          if (res.body && typeof res.body.revision === "string") this.noteRevision(key, res.body.revision);
          else if (method === "DELETE") this.ownRemovals.set(key, (this.ownRemovals.get(key) ?? 0) + 1);
        } else if (res && res.ok && key === null && method === "DELETE") {
          this.ownMapRemoval += 1;
        }
        this.drain();
      },
    });
    let token = null;
    if (key === null) token = method === "DELETE" ? "m" : null;
    else if (res.body && typeof res.body.revision === "string") token = `r:${key}\u0000${res.body.revision}`;
    else if (method === "DELETE") token = `d:${key}`;
    if (token) await this.ownEvent(token);
    return res;
  }

  /**
   * Resolves once this client's event `token` was delivered, at once if it already was or
   * the stream is not open (the event then comes after a reconnect). The deadline only
   * guards against a node that never sends it: every write makes an event.
   */
  ownEvent(token) {
    if (this.ownSeen.delete(token) || !this.live || this.stopped) return Promise.resolve();
    return new Promise((resolve) => {
      const timer = setTimeout(() => this.ownDone(token), OWN_EVENT_WAIT_MS);
      const list = this.ownWaiters.get(token) ?? [];
      list.push({ resolve, timer });
      this.ownWaiters.set(token, list);
    });
  }

  /** This client's event `token` was delivered (or is no longer awaited): its writes go on. */
  ownDone(token) {
    const list = this.ownWaiters.get(token);
    if (!list) return false;
    this.ownWaiters.delete(token);
    for (const w of list) {
      clearTimeout(w.timer);
      w.resolve();
    }
    return true;
  }

  /** No own event will come on this stream: release every write waiting for one. */
  releaseOwn() {
    for (const token of [...this.ownWaiters.keys()]) this.ownDone(token);
    this.ownSeen.clear();
  }

  noteRevision(key, revision) {
    let revs = this.ownRevisions.get(key);
    if (revs) this.ownRevisions.delete(key); // re-inserted: most recent last
    else revs = [];
    revs.push(revision);
    this.ownRevisions.set(key, revs);
    this.ownRevisionCount += 1;
    while (this.ownRevisionCount > OWN_REVISIONS) {
      const [oldKey, oldRevs] = this.ownRevisions.entries().next().value;
      oldRevs.shift();
      this.ownRevisionCount -= 1;
      if (oldRevs.length === 0) this.ownRevisions.delete(oldKey);
    }
  }

  /** Whether `e` (made on this node) was made by this client; consumes the record. */
  claim(e) {
    const mine = this.claimRecord(e);
    if (mine) {
      const token =
        e.type === "map_removed"
          ? "m"
          : e.type === "map_item_removed"
            ? `d:${e.item_key}`
            : `r:${e.item_key}\u0000${e.item_revision}`;
      if (!this.ownDone(token)) {
        this.ownSeen.add(token);
        if (this.ownSeen.size > OWN_SEEN) this.ownSeen.delete(this.ownSeen.values().next().value);
      }
    }
    return mine;
  }

  claimRecord(e) {
    if (!e.is_local) return false;
    if (e.type === "map_removed") {
      if (this.ownMapRemoval > 0) {
        this.ownMapRemoval -= 1;
        return true;
      }
      return false;
    }
    const key = e.item_key;
    if (e.type === "map_item_removed") {
      const n = this.ownRemovals.get(key) ?? 0;
      if (n > 0) {
        if (n === 1) this.ownRemovals.delete(key);
        else this.ownRemovals.set(key, n - 1);
        return true;
      }
      return false;
    }
    const revs = this.ownRevisions.get(key);
    const i = revs ? revs.indexOf(e.item_revision) : -1;
    if (i < 0) return false;
    revs.splice(i, 1);
    this.ownRevisionCount -= 1;
    if (revs.length === 0) this.ownRevisions.delete(key);
    return true;
  }

  /** Whether the locality of `e` cannot be known yet (a write that may have made it is in flight). */
  undecided(e) {
    if (!e.is_local) return false;
    if (e.type === "map_removed") return this.mapWriteInflight > 0;
    return (this.inflight.get(e.item_key) ?? 0) > 0;
  }

  /** Delivers held events, in order, as far as their locality is known. */
  drain() {
    while (this.held.length > 0 && !this.undecided(this.held[0])) {
      const e = this.held.shift();
      this.deliver(e, this.claim(e));
    }
  }

  deliver(e, isLocal) {
    if (e.date_created) this.dateUpdated = new Date(e.date_created);
    let name;
    let args;
    switch (e.type) {
      case "map_item_added":
      case "map_item_updated": {
        const item = SyncMapItem.fromEvent(e);
        name = e.type === "map_item_added" ? "itemAdded" : "itemUpdated";
        args = { item, isLocal, key: item.key, value: item.data, data: item.data, eventId: e.id };
        if (e.type === "map_item_updated") args.previousItemData = e.previous_item_data ?? {};
        break;
      }
      case "map_item_removed":
        name = "itemRemoved";
        args = { key: e.item_key, isLocal, previousItemData: e.previous_item_data ?? {}, eventId: e.id };
        break;
      case "map_removed":
        name = "removed";
        args = { isLocal, eventId: e.id };
        break;
      default:
        return; // a newer node's event type: not ours to interpret
    }
    for (const v of [...this.views]) v._emit(name, args);
    if (name === "removed") this.gone();
  }

  // ---- the event stream -----------------------------------------------------------------

  async run() {
    const client = this.client;
    let backoff = BACKOFF_MIN_MS;
    while (!this.stopped) {
      try {
        await client.connected();
      } catch (e) {
        this.failReady(e);
        if (this.stopped || client.isShutDown) return;
        await client.stateChange();
        continue;
      }
      if (this.stopped) return;
      const ctrl = new AbortController();
      this.abort = ctrl;
      let idle = null;
      const touch = () => {
        clearTimeout(idle);
        idle = setTimeout(() => ctrl.abort(), STREAM_IDLE_MS);
      };
      try {
        const headers = { accept: "text/event-stream", ...client.authHeader() };
        if (this.lastId !== null) headers["last-event-id"] = String(this.lastId);
        touch();
        const res = await client.fetchImpl(client.url(`${API}/Maps/${seg(this.sid)}/Events`), {
          headers,
          signal: ctrl.signal,
        });
        if (res.status === 401) {
          client.refused();
          continue;
        }
        if (res.status === 404) {
          // Removed while this client was away: the map is gone, say so once, after the
          // events already held (local if this client's own removeMap did it).
          this.held.push({
            type: "map_removed",
            is_local: this.ownMapRemoval > 0 || this.mapWriteInflight > 0,
            id: this.lastId ?? 0,
          });
          this.drain();
          return;
        }
        if (res.status === 410) {
          this.reset(await errorOf(res));
          continue;
        }
        if (!res.ok || !res.body) {
          await res.body?.cancel();
          await client.pause(backoff);
          backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
          continue;
        }
        const opened = Date.now();
        this.live = true;
        const parser = new SseParser();
        const decoder = new TextDecoder();
        const reader = res.body.getReader();
        let failed = false; // the node ended the stream with an `error` message
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          touch();
          for (const msg of parser.push(decoder.decode(value, { stream: true }))) {
            if (msg.event === "error") {
              let err = null;
              try {
                err = JSON.parse(msg.data ?? "{}");
              } catch {}
              if (err && err.code === 20410) this.reset(new SyncError(err.message, 410, 20410));
              failed = true;
              break;
            }
            if (msg.data !== null) this.received(msg.data);
            if (msg.id !== null && /^\d+$/.test(msg.id)) {
              const id = Number(msg.id);
              if (this.lastId === null || id > this.lastId) this.lastId = id;
              this.markReady();
            }
            if (this.stopped) break;
          }
          if (this.stopped || failed) break;
        }
        if (failed) {
          // The node answered, so it is reachable: open the stream again (from the resume point
          // or, after a reset, from now), more slowly if this keeps happening.
          await reader.cancel().catch(() => {});
          if (Date.now() - opened < 2_000) {
            await client.pause(backoff);
            backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
          } else backoff = BACKOFF_MIN_MS;
          continue;
        }
        // The node ended the stream (it is shutting down): find out when it is back; a stream
        // that keeps ending at once is retried ever more slowly.
        if (!this.stopped) {
          client.unreachable();
          if (Date.now() - opened < 2_000) {
            await client.pause(backoff);
            backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
          } else backoff = BACKOFF_MIN_MS;
        }
      } catch (e) {
        if (this.stopped) return;
        client.unreachable();
      } finally {
        clearTimeout(idle);
        this.abort = null;
        this.live = false;
        this.releaseOwn();
      }
    }
  }

  received(text) {
    let e;
    try {
      e = JSON.parse(text);
    } catch {
      return;
    }
    if (!e || typeof e.id !== "number") return;
    if (this.lastId !== null && e.id <= this.lastId) return; // already delivered
    this.lastId = e.id;
    this.markReady();
    this.held.push(e);
    this.drain();
  }

  /** The events after our resume point are gone: start from now, and say so. */
  reset(error) {
    this.lastId = null;
    this.client.emit("streamReset", { sid: this.sid, error });
  }

  gone() {
    this.removed = true;
    this.stop();
  }

  stop() {
    this.stopped = true;
    this.live = false;
    this.releaseOwn();
    this.abort?.abort();
    this.failReady(new SyncError("the map was closed", 0, ErrorCodes.SHUT_DOWN));
    this.client.forget(this);
  }
}

async function errorOf(res) {
  let body = null;
  try {
    body = await res.json();
  } catch {}
  if (body && typeof body.code === "number") {
    return new SyncError(body.message ?? `HTTP ${res.status}`, body.status ?? res.status, body.code);
  }
  return new SyncError(`the node answered HTTP ${res.status}`, res.status, ErrorCodes.BAD_ANSWER);
}

/** A map of JSON items. */
export class SyncMap extends Emitter {
  #core;
  #closed = false;
  /** Events waiting while `snapshot()` reads (null: none is reading). */
  #hold = null;
  /** What the last snapshot showed, per page: events it shows are not delivered. */
  #covered = null;
  /** The last `snapshot()` call, and when its held events have gone out. */
  #snapshotTail = Promise.resolve();
  #released = Promise.resolve();

  /** @internal */
  constructor(core) {
    super();
    this.#core = core;
    core.views.add(this);
  }

  get sid() {
    return this.#core.sid;
  }

  get uniqueName() {
    return this.#core.uniqueName;
  }

  get dateUpdated() {
    return this.#core.dateUpdated;
  }

  get dateExpires() {
    return this.#core.dateExpires;
  }

  #path(key) {
    const base = `${API}/Maps/${seg(this.#core.sid)}`;
    return key === undefined ? base : `${base}/Items/${seg(key)}`;
  }

  #check() {
    if (this.#closed) throw new SyncError("this map object was closed", 0, ErrorCodes.SHUT_DOWN);
  }

  async set(key, data, metadata) {
    this.#check();
    checkKey(key);
    checkData(data);
    const core = this.#core;
    return core.keyed(key, async () => {
      const res = await core.write(key, "POST", this.#path(key), {
        body: { Data: data, ...ttlParams(metadata) },
        verify: () => this.#holding(key, (d) => sameJson(d, data)),
      });
      return SyncMapItem.fromResource(res.body);
    });
  }

  async update(key, data, metadata) {
    this.#check();
    checkKey(key);
    checkData(data);
    const core = this.#core;
    return core.keyed(key, async () => {
      const res = await core.write(key, "PATCH", this.#path(key), {
        body: { Data: data, ...ttlParams(metadata) },
        verify: () => this.#holding(key, (d) => Object.keys(data).every((f) => sameJson(d[f], data[f]))),
      });
      return SyncMapItem.fromResource(res.body);
    });
  }

  async mutate(key, mutator, metadata) {
    this.#check();
    checkKey(key);
    if (typeof mutator !== "function") throw new TypeError("mutator must be a function");
    const core = this.#core;
    const retries = this.#core.client.mutateRetries;
    return core.keyed(key, async () => {
      let lastError = null;
      for (let attempt = 0; attempt < retries; attempt++) {
        if (attempt > 0) await core.client.pause(Math.random() * 10 * attempt);
        const current = await this.#fetchItem(key);
        const next = mutator(structuredClone(current ? current.data : {}));
        if (next && typeof next.then === "function") {
          // An async mutator would be written as `{}`: refuse it rather than lose the data.
          throw new TypeError("the mutator must return the new data, not a promise: make it synchronous");
        }
        if (next === null || next === undefined) return current;
        checkData(next);
        try {
          // A lost answer: the write happened if the item now holds `next` (and, replacing
          // `current`, has another revision). Sending it again would conflict with itself
          // and apply the mutator twice.
          const res = current
            ? await core.write(key, "POST", this.#path(key), {
                body: { Data: next, ...ttlParams(metadata) },
                headers: { "if-match": `"${current.revision}"` },
                verify: () => this.#holding(key, (d, rev) => rev !== current.revision && sameJson(d, next)),
              })
            : await core.write(key, "POST", `${this.#path()}/Items`, {
                body: { Key: key, Data: next, ...ttlParams(metadata) },
                verify: () => this.#holding(key, (d) => sameJson(d, next)),
              });
          return SyncMapItem.fromResource(res.body);
        } catch (e) {
          // Another writer got there first (changed it, created it, or removed it): retry.
          const conflict =
            e instanceof SyncError &&
            (e.code === ErrorCodes.REVISION_MISMATCH || e.code === ErrorCodes.ITEM_EXISTS || (current && e.code === ErrorCodes.ITEM_NOT_FOUND));
          if (!conflict) throw e;
          lastError = e;
        }
      }
      throw new SyncError(
        `mutate gave up after ${retries} attempts: the item kept changing (${lastError?.message})`,
        lastError?.status ?? 412,
        lastError?.code ?? ErrorCodes.REVISION_MISMATCH,
      );
    });
  }

  /** The node's answer for the item if its data passes `test(data, revision)`, else null. */
  async #holding(key, test) {
    try {
      const res = await this.#core.client.send("GET", this.#path(key));
      return res.body && test(res.body.data, res.body.revision) ? res : null;
    } catch (e) {
      if (e instanceof SyncError && e.code === ErrorCodes.ITEM_NOT_FOUND) return null;
      throw e;
    }
  }

  /** The item, or null when it does not exist. */
  async #fetchItem(key) {
    try {
      const res = await this.#core.client.send("GET", this.#path(key));
      return SyncMapItem.fromResource(res.body);
    } catch (e) {
      if (e instanceof SyncError && e.code === ErrorCodes.ITEM_NOT_FOUND) return null;
      throw e;
    }
  }

  async get(key) {
    this.#check();
    checkKey(key);
    return this.#core.keyed(key, async () => {
      const res = await this.#core.client.send("GET", this.#path(key));
      return SyncMapItem.fromResource(res.body);
    });
  }

  /**
   * The item's conflicts as this node sees them: `{ key, values, fields, writers }`, where
   * `values` lists whole values several nodes wrote concurrently (set, mutate, create; the
   * visible one first, empty unless there are two or more), `fields` maps each field updated
   * concurrently on several nodes to every value the merge kept (the visible one first) and
   * `writers` lists the node ids whose concurrent writes are current.
   * Rejects with SyncError 54201 when there is no such item.
   */
  async getConflicts(key) {
    this.#check();
    checkKey(key);
    const res = await this.#core.client.send("GET", `${this.#path(key)}/Conflicts`);
    const { key: k, values, fields, writers } = res.body;
    return { key: k, values, fields, writers };
  }

  async remove(key) {
    this.#check();
    checkKey(key);
    const core = this.#core;
    await core.keyed(key, () =>
      core.write(key, "DELETE", this.#path(key), {
        // A lost answer: if the item is gone, the removal happened.
        verify: async () => ((await this.#fetchItem(key)) === null ? REMOVED : null),
      }),
    );
  }

  async setItemTtl(key, ttl) {
    this.#check();
    checkKey(key);
    const core = this.#core;
    await core.keyed(key, () => core.write(key, "POST", this.#path(key), { body: { Ttl: ttl } }));
  }

  async setTtl(ttl) {
    this.#check();
    const core = this.#core;
    await core.mapWide(async () => {
      const res = await core.client.send("POST", this.#path(), { body: { Ttl: ttl } });
      core.dateExpires = date(res.body.date_expires);
    });
  }

  async getItems(query = {}) {
    this.#check();
    const core = this.#core;
    const first = {};
    if (query.from !== undefined && query.from !== null) first.From = String(query.from);
    if (query.pageSize !== undefined) first.PageSize = String(query.pageSize);
    if (query.order !== undefined) first.Order = query.order;
    const load = async (params) => {
      const res = await core.client.send("GET", `${this.#path()}/Items`, { query: params });
      const body = res.body;
      if (!body || !Array.isArray(body.items) || !body.meta) {
        throw new SyncError("the node's item page is not understood", res.status, ErrorCodes.BAD_ANSWER);
      }
      const size = first.PageSize ? { PageSize: first.PageSize } : {};
      const at = (url) => {
        const t = pageToken(url);
        return t === null ? null : { ...size, PageToken: t };
      };
      return new Paginator(body.items.map(SyncMapItem.fromResource), at(body.meta.previous_page_url), at(body.meta.next_page_url), (p) =>
        core.client.admitted(() => load(p)),
      );
    };
    return core.mapWide(() => load(first));
  }

  /**
   * Every live item (all pages), lined up with this object's events: an event delivered to
   * its handlers after the promise resolves is a change the items do not show, and every such
   * change is delivered; none the items show is. Events that arrive meanwhile wait.
   * Resolves to `{ items, lastEventId }` (`lastEventId`: the first page's, from the node).
   */
  async snapshot() {
    this.#check();
    // One at a time per object, each after the previous one's events went out: two holds
    // at once would reorder events.
    const run = this.#snapshotTail.then(() => this.#takeSnapshot());
    this.#snapshotTail = run.then(
      () => this.#released,
      () => this.#released,
    );
    return run;
  }

  async #takeSnapshot() {
    const core = this.#core;
    const hold = [];
    this.#hold = hold;
    let release;
    this.#released = new Promise((r) => (release = r));
    try {
      const read = async (params) => {
        const res = await core.client.send("GET", `${this.#path()}/Items`, { query: params });
        const body = res.body;
        const id = body?.meta?.last_event_id;
        if (!body || !Array.isArray(body.items) || !Number.isSafeInteger(id)) {
          throw new SyncError("the node's item page is not understood (a node older than this client?)", res.status, ErrorCodes.BAD_ANSWER);
        }
        return { items: body.items.map(SyncMapItem.fromResource), id, next: pageToken(body.meta.next_page_url) };
      };
      const items = [];
      const pages = []; // the key range each page covers (up to `last`, inclusive) and its event id
      let page = await core.mapWide(() => read({ PageSize: "100" }));
      for (;;) {
        items.push(...page.items);
        const last = page.next === null || page.items.length === 0 ? null : page.items[page.items.length - 1].key;
        pages.push({ last, id: page.id });
        if (page.next === null) break;
        const token = page.next;
        page = await core.client.admitted(() => read({ PageSize: "100", PageToken: token }));
      }
      this.#covered = { pages, maxId: Math.max(...pages.map((p) => p.id)) };
      return { items, lastEventId: pages[0].id };
    } finally {
      // After the caller has the items (its code after `await` runs first), in order; events
      // arriving until then join the queue.
      setTimeout(() => {
        this.#hold = null;
        for (const [name, args] of hold) this._emit(name, args);
        release();
      }, 0);
    }
  }

  async removeMap() {
    this.#check();
    const core = this.#core;
    await core.mapWide(() =>
      core.write(null, "DELETE", this.#path(), {
        verify: async () => {
          try {
            await core.client.send("GET", this.#path());
            return null;
          } catch (e) {
            if (e instanceof SyncError && e.code === ErrorCodes.MAP_NOT_FOUND) return REMOVED;
            throw e;
          }
        },
      }),
    );
  }

  close() {
    if (this.#closed) return;
    this.#closed = true;
    this.removeAllListeners();
    this.#core.views.delete(this);
    if (this.#core.views.size === 0) this.#core.stop();
  }

  /** @internal */
  _emit(name, args) {
    if (this.#closed) return;
    if (this.#hold) {
      this.#hold.push([name, args]);
      return;
    }
    const covered = this.#covered;
    if (covered && typeof args.eventId === "number") {
      if (args.eventId > covered.maxId) this.#covered = null;
      else if (args.key !== undefined) {
        // The page whose key range holds the key was read after this event: it shows it.
        const page = covered.pages.find((p) => p.last === null || compareKeys(args.key, p.last) <= 0);
        if (page && args.eventId <= page.id) return;
      }
    }
    this.emit(name, args);
  }
}

/** Key order as the node lists keys: by code point (UTF-16 order differs past U+FFFF). */
export function compareKeys(a, b) {
  const ia = a[Symbol.iterator]();
  const ib = b[Symbol.iterator]();
  for (;;) {
    const x = ia.next();
    const y = ib.next();
    if (x.done || y.done) return x.done ? (y.done ? 0 : -1) : 1;
    const cx = x.value.codePointAt(0);
    const cy = y.value.codePointAt(0);
    if (cx !== cy) return cx < cy ? -1 : 1;
  }
}

/** A client of one syncmesh node. */
export class SyncClient extends Emitter {
  #base;
  #token;
  #fetch;
  #state = "connecting";
  #shutDown = false;
  #abort = new AbortController();
  #waiters = []; // operations waiting for the node to be reachable
  #outstanding = 0; // operations called and not settled
  #probing = false;
  #cores = new Map(); // sid -> MapCore
  #opening = new Map(); // sid -> Promise<MapCore>
  #stateWaiters = [];
  #sending = new Set(); // requests sent and not answered

  constructor(tokenOrOptions, maybeOptions) {
    super();
    const options =
      typeof tokenOrOptions === "string" ? { ...(maybeOptions ?? {}), token: tokenOrOptions } : { ...(tokenOrOptions ?? {}) };
    const origin = globalThis.location?.origin;
    const url = options.url ?? (origin && origin !== "null" ? origin : undefined);
    if (!url) throw new SyncError("SyncClient needs { url } (the node's address, e.g. http://127.0.0.1:7700)", 0, 20001);
    this.#base = String(url).replace(/\/+$/, "");
    this.#token = options.token || null;
    this.#fetch = options.fetch ?? globalThis.fetch.bind(globalThis);
    this.maxQueue = options.maxQueue ?? 1000;
    this.mutateRetries = Math.max(1, options.mutateRetries ?? 10);
    // A browser knows when the network comes back: try at once instead of at the next backoff.
    this.onOnline = () => {
      this.wake?.();
    };
    globalThis.addEventListener?.("online", this.onOnline);
    this.#probe();
  }

  get connectionState() {
    return this.#state;
  }

  /** @internal */
  get isShutDown() {
    return this.#shutDown;
  }

  /** @internal */
  fetchImpl(url, init) {
    return this.#fetch(url, { ...init, signal: anySignal(init.signal, this.#abort.signal) });
  }

  /** @internal */
  url(path, query) {
    const q = query && Object.keys(query).length ? `?${new URLSearchParams(query)}` : "";
    return `${this.#base}${path}${q}`;
  }

  /** @internal */
  authHeader() {
    return this.#token ? { authorization: `Bearer ${this.#token}` } : {};
  }

  #setState(s) {
    if (this.#state === s) return;
    this.#state = s;
    this.emit("connectionStateChanged", s);
    const waiters = this.#stateWaiters;
    this.#stateWaiters = [];
    for (const w of waiters) w();
  }

  /** @internal Resolves after `ms`, or at once when the client shuts down (no timer outlives it). */
  pause(ms) {
    if (this.#shutDown) return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(t);
        this.#abort.signal.removeEventListener("abort", done);
        resolve();
      };
      const t = setTimeout(done, ms);
      this.#abort.signal.addEventListener("abort", done, { once: true });
    });
  }

  /** @internal Resolves at the next change of connection state. */
  stateChange() {
    return new Promise((r) => this.#stateWaiters.push(r));
  }

  /** @internal Resolves once the node is reachable; rejects after shutdown or refusal. */
  connected() {
    if (this.#shutDown) return Promise.reject(shutDownError());
    if (this.#state === "connected") return Promise.resolve();
    if (this.#state === "denied") return Promise.reject(deniedError());
    return new Promise((resolve, reject) => this.#waiters.push({ resolve, reject }));
  }

  /**
   * @internal Counts an operation from its call until it settles (call the returned function
   * then). While the node is unreachable at most `maxQueue` may wait: beyond that it throws.
   */
  enter() {
    if (this.#shutDown) throw shutDownError();
    if (this.#state !== "connected" && this.#outstanding >= this.maxQueue) {
      throw new SyncError(
        `the node is unreachable and ${this.maxQueue} operations already wait for it`,
        429,
        ErrorCodes.QUEUE_FULL,
      );
    }
    this.#outstanding += 1;
    let done = false;
    return () => {
      if (!done) {
        done = true;
        this.#outstanding -= 1;
      }
    };
  }

  /** @internal Runs operation `fn`, counted as `enter` says. */
  async admitted(fn) {
    const release = this.enter();
    try {
      return await fn();
    } finally {
      release();
    }
  }

  /**
   * @internal One request; waits while the node is unreachable and sends it again when it is
   * back. Resolves `{status, ok, body, headers}` for a 2xx answer, rejects with SyncError
   * otherwise.
   */
  async send(method, path, opts = {}) {
    // `onSend` once before the first attempt, `onSettled` once at the end: a write whose
    // answer was lost stays in flight (its events wait) until its outcome is known.
    let sent = false;
    let unknown = false; // the last attempt may have taken effect: its answer was lost
    const settle = (result) => {
      if (sent) opts.onSettled?.(result);
      sent = false;
    };
    for (;;) {
      try {
        await this.connected();
        if (unknown && opts.verify) {
          // Did the lost attempt do it? Then that is the answer; else send it again.
          let done = null;
          try {
            done = await opts.verify();
          } catch (e) {
            if (this.#shutDown || (e instanceof SyncError && e.status === 401)) throw e;
          }
          if (done) {
            settle(done);
            return done;
          }
        }
      } catch (e) {
        settle(null);
        throw e;
      }
      const headers = { ...this.authHeader(), ...(opts.headers ?? {}) };
      let body;
      if (opts.body !== undefined) {
        headers["content-type"] = "application/json";
        body = JSON.stringify(opts.body);
      }
      if (!sent) {
        sent = true;
        opts.onSend?.();
      }
      let res;
      // The answer is read whole here, so that shutdown() can wait for it.
      const request = this.fetchImpl(this.url(path, opts.query), { method, headers, body }).then((r) =>
        r.text().then(
          (text) => answered(r, text),
          () => answered(r, null),
        ),
      );
      this.#sending.add(request);
      request.then(
        () => this.#sending.delete(request),
        () => this.#sending.delete(request),
      );
      try {
        res = await request;
      } catch (e) {
        if (this.#shutDown) {
          settle(null);
          throw shutDownError();
        }
        unknown = true;
        this.unreachable();
        continue;
      }
      let result;
      try {
        result = await readAnswer(res);
      } catch (e) {
        if (e instanceof Unreachable) {
          if (this.#shutDown) {
            settle(null);
            throw shutDownError();
          }
          unknown = true;
          this.unreachable();
          continue;
        }
        settle(null);
        if (e instanceof SyncError && e.status === 401) this.refused();
        throw e;
      }
      settle(result);
      return result;
    }
  }

  /** @internal The node did not answer: find out when it is back. */
  unreachable() {
    if (this.#shutDown || this.#state === "denied") return;
    if (this.#state === "connected") this.#setState("disconnected");
    this.#probe();
  }

  /** @internal The node refused the token. */
  refused() {
    if (this.#shutDown) return;
    this.#setState("denied");
    const waiters = this.#waiters;
    this.#waiters = [];
    for (const w of waiters) w.reject(deniedError());
  }

  async #probe() {
    if (this.#probing || this.#shutDown) return;
    this.#probing = true;
    let backoff = BACKOFF_MIN_MS;
    try {
      while (!this.#shutDown && this.#state !== "denied") {
        let res = null;
        // A timer of its own, cleared once answered (AbortSignal.timeout's would outlive shutdown).
        const timeout = new AbortController();
        const timer = setTimeout(() => timeout.abort(), PROBE_TIMEOUT_MS);
        try {
          res = await this.fetchImpl(this.url("/v1/Node"), {
            headers: this.authHeader(),
            signal: timeout.signal,
          });
          // Read, not cancelled: browsers log a cancelled body as a failed request.
          await res.text();
        } catch {
          res = null;
        } finally {
          clearTimeout(timer);
        }
        if (this.#shutDown) return;
        if (res && res.ok) {
          this.#setState("connected");
          const waiters = this.#waiters;
          this.#waiters = [];
          for (const w of waiters) w.resolve();
          return;
        }
        if (res && res.status === 401) {
          this.refused();
          return;
        }
        this.#setState(res ? "error" : "disconnected");
        await new Promise((r) => {
          const t = setTimeout(r, backoff * (0.75 + Math.random() * 0.5));
          this.wake = () => {
            clearTimeout(t);
            r();
          };
        });
        this.wake = null;
        backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
      }
    } finally {
      this.#probing = false;
    }
  }

  /** Opens a map: by unique name or sid (`open_or_create`), or as `options` say. */
  async map(nameOrOptions = {}) {
    const o = typeof nameOrOptions === "string" ? { id: nameOrOptions } : { ...nameOrOptions };
    const mode = o.mode ?? "open_or_create";
    if (!["create_new", "open_existing", "open_or_create"].includes(mode)) {
      throw new SyncError(`unknown mode ${JSON.stringify(mode)}: create_new, open_existing or open_or_create`, 400, 20001);
    }
    if (o.id !== undefined && (typeof o.id !== "string" || o.id.length === 0)) {
      throw new SyncError("the map id must be a non-empty string (a sid or a unique name)", 400, 54302);
    }
    if (o.id === "." || o.id === "..") {
      throw new SyncError(`the map name ${JSON.stringify(o.id)} is not allowed`, 400, 54302);
    }
    const resource = await this.admitted(() => this.#open(o.id, mode, o.ttl));
    const core = await this.#core(resource);
    await core.ready;
    return new SyncMap(core);
  }

  async #open(id, mode, ttl) {
    const create = async () => {
      const body = {};
      if (id !== undefined) body.UniqueName = id;
      if (ttl !== undefined && ttl !== null) body.Ttl = ttl;
      return (await this.send("POST", `${API}/Maps`, { body })).body;
    };
    const fetchMap = async () => (await this.send("GET", `${API}/Maps/${seg(id)}`)).body;
    if (mode === "create_new") return create();
    if (id === undefined) {
      if (mode === "open_existing") throw new SyncError("open_existing needs the map's id", 400, 54200);
      return create();
    }
    if (mode === "open_existing") return fetchMap();
    // open_or_create: a lost race to create it means it exists now.
    for (let attempt = 0; ; attempt++) {
      try {
        return await fetchMap();
      } catch (e) {
        if (!(e instanceof SyncError) || e.code !== ErrorCodes.MAP_NOT_FOUND || SID.test(id)) throw e;
      }
      try {
        return await create();
      } catch (e) {
        if (!(e instanceof SyncError) || e.code !== ErrorCodes.NAME_TAKEN || attempt >= 3) throw e;
      }
    }
  }

  async #core(resource) {
    const existing = this.#cores.get(resource.sid);
    if (existing && !existing.stopped) return existing;
    const core = new MapCore(this, resource);
    this.#cores.set(resource.sid, core);
    return core;
  }

  /** @internal */
  forget(core) {
    if (this.#cores.get(core.sid) === core) this.#cores.delete(core.sid);
  }

  /** Live maps of the node, a page at a time. */
  async maps(query = {}) {
    const first = query.pageSize !== undefined ? { PageSize: String(query.pageSize) } : {};
    const load = async (params) => {
      const res = await this.send("GET", `${API}/Maps`, { query: params });
      const body = res.body;
      if (!body || !Array.isArray(body.maps) || !body.meta) {
        throw new SyncError("the node's map page is not understood", res.status, ErrorCodes.BAD_ANSWER);
      }
      const at = (url) => {
        const t = pageToken(url);
        return t === null ? null : { ...first, PageToken: t };
      };
      return new Paginator(body.maps.map(mapDescriptor), at(body.meta.previous_page_url), at(body.meta.next_page_url), (p) =>
        this.admitted(() => load(p)),
      );
    };
    return this.admitted(() => load(first));
  }

  /** The node's identity, addresses and peers. */
  async node() {
    return this.admitted(async () => (await this.send("GET", "/v1/Node")).body);
  }

  /** Replaces the token and reconnects (e.g. after `denied`). */
  async updateToken(token) {
    this.#token = token || null;
    if (this.#shutDown) throw shutDownError();
    if (this.#state === "denied") this.#setState("connecting");
    this.wake?.();
    this.#probe();
  }

  /** Ends every stream; waiting operations reject with SyncError 20499. */
  async shutdown() {
    if (this.#shutDown) return;
    this.#shutDown = true;
    globalThis.removeEventListener?.("online", this.onOnline);
    this.wake?.();
    for (const core of [...this.#cores.values()]) core.stop();
    const waiters = this.#waiters;
    this.#waiters = [];
    for (const w of waiters) w.reject(shutDownError());
    // Requests already sent get their answers (a while at most): they may have taken effect,
    // and their callers should hear so. Only then is the rest cut off.
    if (this.#sending.size > 0) {
      let timer;
      await Promise.race([
        Promise.allSettled([...this.#sending]),
        new Promise((r) => (timer = setTimeout(r, SHUTDOWN_DRAIN_MS))),
      ]);
      clearTimeout(timer);
    }
    this.#abort.abort();
    this.#setState("disconnected");
  }
}

function shutDownError() {
  return new SyncError("the client was shut down", 0, ErrorCodes.SHUT_DOWN);
}

function deniedError() {
  return new SyncError("the node refused the token", 401, ErrorCodes.UNAUTHORIZED);
}

/** An answer whose body was read already (`text` null: it was cut off). */
function answered(r, text) {
  return {
    ok: r.ok,
    status: r.status,
    headers: r.headers,
    text: async () => {
      if (text === null) throw new Error("the answer was cut off");
      return text;
    },
  };
}

/** Reads an answer: `{status, ok, body, headers}` for 2xx, a SyncError otherwise. */
async function readAnswer(res) {
  let text;
  try {
    text = await res.text();
  } catch {
    throw new Unreachable("the answer was cut off");
  }
  let body = null;
  if (text.length > 0) {
    try {
      body = JSON.parse(text);
    } catch {
      body = undefined;
    }
  }
  if (res.ok) {
    if (body === undefined) throw new SyncError("the node's answer is not JSON", res.status, ErrorCodes.BAD_ANSWER);
    return { status: res.status, ok: true, body, headers: res.headers };
  }
  if (body && typeof body.code === "number") {
    throw new SyncError(body.message ?? `HTTP ${res.status}`, body.status ?? res.status, body.code);
  }
  throw new SyncError(`the node answered HTTP ${res.status}`, res.status, res.status === 401 ? ErrorCodes.UNAUTHORIZED : ErrorCodes.BAD_ANSWER);
}

/** A signal aborted when either is (AbortSignal.any is not in every supported runtime). */
function anySignal(a, b) {
  if (!a) return b;
  if (typeof AbortSignal.any === "function") return AbortSignal.any([a, b]);
  const c = new AbortController();
  const abort = () => c.abort();
  if (a.aborted || b.aborted) c.abort();
  a.addEventListener("abort", abort, { once: true });
  b.addEventListener("abort", abort, { once: true });
  return c.signal;
}

export default SyncClient;
