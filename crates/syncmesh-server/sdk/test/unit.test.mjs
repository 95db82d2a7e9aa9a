// Unit tests of the client's own logic against a scripted fake node (no sockets): the SSE
// parser, paging, mutate's retries, the offline queue, per-key order, `isLocal` and resumption.
import { test } from "node:test";
import assert from "node:assert/strict";
import { SyncClient, SyncError, SseParser, pageToken, compareKeys } from "../syncmesh.js";

const P = "/v1/Services/default";
const SID = "MP" + "0".repeat(31) + "1";

/** Resolves after pending promise callbacks (and one timer turn) have run. */
const settle = () => new Promise((r) => setTimeout(r, 0));

/** Polls `cond` on timer turns; fails after many turns (nothing here waits on real I/O). */
async function until(what, cond) {
  for (let i = 0; i < 2000; i++) {
    if (cond()) return;
    await new Promise((r) => setTimeout(r, 1));
  }
  throw new Error(`never: ${what}`);
}

function json(status, body, headers = {}) {
  return new Response(body === null ? null : JSON.stringify(body), {
    status,
    headers: { "content-type": "application/json", ...headers },
  });
}

function item(key, data, revision) {
  return {
    key,
    map_sid: SID,
    data,
    revision,
    date_created: "2026-11-28T00:00:00.000Z",
    date_updated: "2026-11-28T00:00:00.000Z",
    date_expires: null,
    created_by: "n1",
    url: "",
  };
}

const MAP = {
  sid: SID,
  unique_name: "m",
  revision: "0",
  date_created: "2026-11-28T00:00:00.000Z",
  date_updated: "2026-11-28T00:00:00.000Z",
  date_expires: null,
  created_by: "n1",
  url: "",
  links: { items: "", events: "" },
};

/**
 * A scripted node. `route(req)` answers API requests (return a Response, or undefined for the
 * default); event streams are driven with `push(event)` / `dropStreams()`; `offline = true`
 * makes every request fail as an unreachable host does.
 */
class FakeNode {
  constructor(route = () => undefined) {
    this.route = route;
    this.requests = [];
    this.streams = [];
    this.streamRequests = [];
    this.offline = false;
    // As a node does, every write answered makes an event (sent just after the answer).
    this.autoEvents = true;
    this.nextEventId = 1000;
    this.fetch = this.fetch.bind(this);
  }

  async fetch(url, init = {}) {
    const u = new URL(url);
    const req = {
      method: init.method ?? "GET",
      path: decodeURIComponent(u.pathname),
      query: Object.fromEntries(u.searchParams),
      headers: init.headers ?? {},
      body: init.body ? JSON.parse(init.body) : undefined,
    };
    if (this.offline) throw new TypeError("fetch failed");
    if (req.path === "/v1/Node") return json(200, { node_id: "n1" });
    if (req.path.endsWith("/Events")) return this.#stream(req, init.signal);
    this.requests.push(req);
    const answer = await this.route(req);
    if (answer) {
      if (this.autoEvents && answer.ok && req.method !== "GET") this.#eventFor(req, answer.clone());
      return answer;
    }
    if (req.method === "GET" && req.path === `${P}/Maps/m`) return json(200, MAP);
    if (req.method === "GET" && req.path === `${P}/Maps/${SID}`) return json(200, MAP);
    return json(404, { code: 20404, message: "no route", status: 404 });
  }

  #stream(req, signal) {
    this.streamRequests.push(req);
    if (this.streamStatus) return json(this.streamStatus, { code: 54200, message: "no map", status: this.streamStatus });
    let controller;
    const body = new ReadableStream({
      start(c) {
        controller = c;
      },
    });
    const s = { controller, open: true };
    this.streams.push(s);
    signal?.addEventListener("abort", () => {
      if (s.open) {
        s.open = false;
        try {
          controller.error(new DOMException("aborted", "AbortError"));
        } catch {}
      }
    });
    // As the node does: the resume point first.
    controller.enqueue(new TextEncoder().encode(`id: ${req.headers["last-event-id"] ?? 0}\n\n`));
    return new Response(body, { status: 200, headers: { "content-type": "text/event-stream" } });
  }

  async #eventFor(req, answer) {
    const text = await answer.text();
    const body = text ? JSON.parse(text) : null;
    const key = req.path.includes("/Items/") ? req.path.split("/Items/")[1] : req.body?.Key;
    const id = this.nextEventId++;
    if (req.method === "DELETE") {
      this.push(key === undefined ? { id, type: "map_removed", map_sid: SID, is_local: true } : event(id, "map_item_removed", key, null, null, true));
    } else if (body?.revision) {
      this.push(event(id, "map_item_updated", body.key, body.data, body.revision, true));
    }
  }

  /** Sends `ev` on every open stream. */
  push(ev) {
    const text = `id: ${ev.id}\ndata: ${JSON.stringify(ev)}\n\n`;
    for (const s of this.streams) if (s.open) s.controller.enqueue(new TextEncoder().encode(text));
  }

  /** Ends every open stream, as a node going away does. */
  dropStreams() {
    for (const s of this.streams) {
      if (s.open) {
        s.open = false;
        s.controller.close();
      }
    }
  }
}

function event(id, type, key, data, revision, isLocal) {
  return {
    id,
    type,
    map_sid: SID,
    item_key: key,
    item_data: data,
    previous_item_data: type === "map_item_updated" ? {} : null,
    item_revision: revision,
    is_local: isLocal,
    date_created: "2026-11-28T00:00:00.000Z",
  };
}

async function open(node, opts = {}) {
  const client = new SyncClient({ url: "http://fake", fetch: node.fetch, ...opts });
  const map = await client.map("m");
  return { client, map };
}

test("SSE parser: split chunks, CRLF, comments, id-only messages, multi-line data", () => {
  const p = new SseParser();
  assert.deepEqual(p.push(": keep-alive\n\nid: 4\n"), []);
  assert.deepEqual(p.push("\n"), [{ event: "message", data: null, id: "4" }]);
  assert.deepEqual(p.push("id: 5\r\ndata: {\"a\"\r"), []);
  assert.deepEqual(p.push("\ndata: :1}\r\n\r\n"), [{ event: "message", data: '{"a"\n:1}', id: "5" }]);
  assert.deepEqual(p.push("event: error\ndata:x\n\n"), [{ event: "error", data: "x", id: null }]);
});

test("page tokens come from the node's page URLs", () => {
  assert.equal(pageToken("http://h/v1/Services/default/Maps/m/Items?PageSize=2&Page=1&PageToken=abc%3D"), "abc=");
  assert.equal(pageToken(null), null);
  assert.equal(pageToken("http://h/x?Page=1"), null);
});

test("paginator: next and previous pages by token, keeping the page size; none past the end", async () => {
  const pages = {
    first: { items: [item("a", {}, "1"), item("b", {}, "2")], prev: null, next: "T2" },
    T2: { items: [item("c", {}, "3")], prev: "T1", next: null },
    T1: { items: [item("a", {}, "1"), item("b", {}, "2")], prev: null, next: "T2" },
  };
  const node = new FakeNode((req) => {
    if (req.path !== `${P}/Maps/${SID}/Items`) return;
    const p = pages[req.query.PageToken ?? "first"];
    const url = (t) => (t ? `http://fake${P}/Maps/${SID}/Items?PageSize=2&Page=9&PageToken=${t}` : null);
    return json(200, { items: p.items, meta: { previous_page_url: url(p.prev), next_page_url: url(p.next) } });
  });
  const { client, map } = await open(node);
  const first = await map.getItems({ pageSize: 2, order: "asc" });
  assert.deepEqual(first.items.map((i) => i.key), ["a", "b"]);
  assert.equal(first.hasPrevPage, false);
  assert.equal(first.hasNextPage, true);
  const second = await first.nextPage();
  assert.deepEqual(second.items.map((i) => i.value), [{}]);
  assert.equal(second.hasNextPage, false);
  await assert.rejects(second.nextPage(), (e) => e instanceof SyncError && e.code === 20400);
  const back = await second.prevPage();
  assert.deepEqual(back.items.map((i) => i.key), ["a", "b"]);
  const listed = node.requests.filter((r) => r.path.endsWith("/Items")).map((r) => r.query);
  assert.deepEqual(listed, [{ PageSize: "2", Order: "asc" }, { PageSize: "2", PageToken: "T2" }, { PageSize: "2", PageToken: "T1" }]);
  await client.shutdown();
});

test("mutate: retried with fresh data on a revision conflict, bounded, and null cancels", async () => {
  let rev = 1;
  let conflicts = 2;
  const node = new FakeNode((req) => {
    if (!req.path.endsWith("/Items/k")) return;
    if (req.method === "GET") return json(200, item("k", { n: rev }, String(rev)));
    if (req.method === "POST") {
      assert.equal(req.headers["if-match"], `"${rev}"`);
      if (conflicts > 0) {
        conflicts -= 1;
        rev += 1; // someone else wrote in between
        return json(412, { code: 54205, message: "revision mismatch", status: 412 });
      }
      rev += 1;
      return json(200, item("k", req.body.Data, String(rev)));
    }
  });
  const { client, map } = await open(node, { mutateRetries: 4 });
  const seen = [];
  const out = await map.mutate("k", (d) => {
    seen.push(d.n);
    return { n: d.n * 10 };
  });
  assert.deepEqual(seen, [1, 2, 3]);
  assert.deepEqual(out.data, { n: 30 });
  conflicts = 100;
  await assert.rejects(
    map.mutate("k", (d) => d),
    (e) => e instanceof SyncError && e.code === 54205 && /4 attempts/.test(e.message),
  );
  const before = node.requests.length;
  const kept = await map.mutate("k", () => null);
  assert.equal(kept.key, "k");
  assert.equal(node.requests.length, before + 1, "a cancelled mutate only reads");
  await client.shutdown();
});

test("mutate of a missing item creates it, and retries when someone else created it first", async () => {
  let exists = false;
  const node = new FakeNode((req) => {
    if (req.method === "GET" && req.path.endsWith("/Items/new")) {
      return exists ? json(200, item("new", { n: 5 }, "9")) : json(404, { code: 54201, message: "no item", status: 404 });
    }
    if (req.method === "POST" && req.path === `${P}/Maps/${SID}/Items`) {
      exists = true; // a concurrent creator won
      return json(409, { code: 54208, message: "exists", status: 409 });
    }
    if (req.method === "POST" && req.path.endsWith("/Items/new")) return json(200, item("new", req.body.Data, "10"));
  });
  const { client, map } = await open(node);
  const seen = [];
  const out = await map.mutate("new", (d) => {
    seen.push(d);
    return { n: (d.n ?? 0) + 1 };
  });
  assert.deepEqual(seen, [{}, { n: 5 }]);
  assert.deepEqual(out.data, { n: 6 });
  await client.shutdown();
});

test("writes to one key go one at a time in call order; other keys do not wait", async () => {
  const gates = [];
  const node = new FakeNode((req) => {
    if (req.method !== "POST") return;
    return new Promise((resolve) => gates.push({ req, answer: () => resolve(json(200, item(req.path.split("/").pop(), req.body.Data, String(gates.length)))) }));
  });
  const { client, map } = await open(node);
  const p1 = map.set("a", { n: 1 });
  const p2 = map.set("a", { n: 2 });
  const p3 = map.set("b", { n: 3 });
  await until("two requests out", () => gates.length === 2);
  await settle();
  assert.deepEqual(gates.map((g) => [g.req.path.split("/").pop(), g.req.body.Data.n]), [["a", 1], ["b", 3]]);
  gates[1].answer();
  await p3;
  assert.equal(gates.length, 2, "a's second write waits for its first");
  gates[0].answer();
  await until("a's second write", () => gates.length === 3);
  assert.deepEqual(gates[2].req.body.Data, { n: 2 });
  gates[2].answer();
  await Promise.all([p1, p2]);
  await client.shutdown();
});

test("offline: operations wait (bounded), then go in call order; shutdown rejects the rest", async () => {
  const node = new FakeNode((req) => {
    if (req.method === "POST") return json(200, item(req.path.split("/").pop(), req.body.Data, "r"));
  });
  const { client, map } = await open(node, { maxQueue: 3 });
  const states = [];
  client.on("connectionStateChanged", (s) => states.push(s));
  node.requests.length = 0;
  node.offline = true;
  node.dropStreams();
  await until("the client notices", () => client.connectionState === "disconnected");
  const waiting = [map.set("x", { i: 1 }), map.set("y", { i: 2 }), map.set("x", { i: 3 })];
  await assert.rejects(map.set("z", {}), (e) => e instanceof SyncError && e.code === 20429 && e.status === 429);
  assert.equal(node.requests.length, 0);
  node.offline = false;
  const done = await Promise.all(waiting);
  assert.deepEqual(done.map((i) => i.data.i), [1, 2, 3]);
  assert.deepEqual(node.requests.map((r) => r.body.Data.i), [1, 2, 3]);
  assert.equal(states.at(-1), "connected");
  node.offline = true;
  node.dropStreams();
  await until("the client notices again", () => client.connectionState === "disconnected");
  const stuck = map.set("x", {});
  await client.shutdown();
  await assert.rejects(stuck, (e) => e.code === 20499);
  await assert.rejects(map.set("x", {}), (e) => e.code === 20499);
});

test("isLocal: an event is held until the write that may have made it answers", async () => {
  let answer;
  let node;
  node = new FakeNode((req) => {
    if (req.method === "POST") return new Promise((r) => (answer = () => r(json(200, item("k", req.body.Data, "rev-mine")))));
  });
  node.autoEvents = false; // this test sends the events itself
  const { client, map } = await open(node);
  const seen = [];
  map.on("itemAdded", (e) => seen.push([e.key, e.isLocal, e.eventId]));
  map.on("itemUpdated", (e) => seen.push([e.key, e.isLocal, e.eventId]));
  const write = map.set("k", { v: 1 });
  await until("the write is out", () => answer);
  // The node's event overtakes its answer; a peer's change to another key comes after it.
  node.push(event(1, "map_item_added", "k", { v: 1 }, "rev-mine", true));
  node.push(event(2, "map_item_added", "other", {}, "rev-peer", false));
  await settle();
  assert.deepEqual(seen, [], "held until the write answers, and order is kept");
  answer();
  await write;
  await until("both delivered", () => seen.length === 2);
  assert.deepEqual(seen, [["k", true, 1], ["other", false, 2]]);
  // Made on this node by another client: local to the node, not to this client.
  node.push(event(3, "map_item_updated", "k", { v: 2 }, "rev-theirs", true));
  await until("delivered", () => seen.length === 3);
  assert.deepEqual(seen[2], ["k", false, 3]);
  await client.shutdown();
});

test("events resume after the last id seen, once each, across a dropped stream", async () => {
  const node = new FakeNode();
  const { client, map } = await open(node);
  const seen = [];
  map.on("itemAdded", (e) => seen.push(e.eventId));
  node.push(event(7, "map_item_added", "a", {}, "r1", false));
  await until("first event", () => seen.length === 1);
  node.dropStreams();
  await until("a new stream", () => node.streams.filter((s) => s.open).length === 1 && node.streamRequests.length === 2);
  assert.equal(node.streamRequests[1].headers["last-event-id"], "7");
  // A repeat of an event already delivered is dropped.
  node.push(event(7, "map_item_added", "a", {}, "r1", false));
  node.push(event(8, "map_item_added", "b", {}, "r2", false));
  await until("second event", () => seen.length >= 2);
  await settle();
  assert.deepEqual(seen, [7, 8]);
  await client.shutdown();
});

test("the older constructor form and a refused token", async () => {
  const node = new FakeNode();
  const refusing = async (url, init) => {
    if (init.headers.authorization !== "Bearer good") return json(401, { code: 20003, message: "no", status: 401 });
    return node.fetch(url, init);
  };
  const client = new SyncClient("bad", { url: "http://fake", fetch: refusing });
  await until("denied", () => client.connectionState === "denied");
  await assert.rejects(client.map("m"), (e) => e.code === 20003 && e.status === 401);
  await client.updateToken("good");
  await until("connected", () => client.connectionState === "connected");
  const map = await client.map("m");
  assert.equal(map.sid, SID);
  await client.shutdown();
});

test("shutdown leaves no timer behind, also while a failing stream backs off", async () => {
  const node = new FakeNode();
  let failStreams = false;
  const f = (url, init) =>
    failStreams && url.endsWith("/Events") ? json(503, { code: 20503, message: "closing", status: 503 }) : node.fetch(url, init);
  const timers = () => process.getActiveResourcesInfo().filter((r) => r === "Timeout").length;
  const before = timers();
  const client = new SyncClient({ url: "http://fake", fetch: f });
  await client.map("m");
  failStreams = true;
  node.dropStreams();
  // The stream ended at once, then answers 503: the client waits (backs off) before each retry.
  await new Promise((r) => setTimeout(r, 700));
  await client.shutdown();
  await settle();
  assert.equal(timers(), before, process.getActiveResourcesInfo().join(","));
});

test("an `error` message on the stream does not report the node as disconnected", async () => {
  const node = new FakeNode();
  const { client, map } = await open(node);
  const states = [];
  const resets = [];
  client.on("connectionStateChanged", (s) => states.push(s));
  client.on("streamReset", (r) => resets.push(r.error.code));
  for (const s of node.streams) {
    s.controller.enqueue(new TextEncoder().encode(`event: error\ndata: {"type":"error","code":20410,"message":"pruned","status":410}\n\n`));
  }
  await until("a new stream", () => node.streamRequests.length === 2);
  assert.deepEqual(resets, [20410]);
  assert.equal(node.streamRequests[1].headers["last-event-id"], undefined);
  await settle();
  assert.deepEqual(states, [], "the node answered all along");
  assert.equal(client.connectionState, "connected");
  void map;
  await client.shutdown();
});

test("a map removed while the stream was down: 'removed' once, local when this client removed it", async () => {
  for (const mine of [false, true]) {
    const node = new FakeNode((req) => {
      if (req.method === "DELETE") return new Response(null, { status: 204 });
    });
    const { client, map } = await open(node);
    const seen = [];
    map.on("removed", (e) => seen.push(e.isLocal));
    // (This fake sends no event for the removal: the stream drops before it would have.)
    if (mine) await map.removeMap();
    node.streamStatus = 404;
    node.dropStreams();
    await until("removed", () => seen.length === 1);
    await settle();
    assert.deepEqual(seen, [mine]);
    await client.shutdown();
  }
});

test("mutateRetries is at least one attempt", async () => {
  const node = new FakeNode((req) => {
    if (req.method === "GET" && req.path.endsWith("/Items/k")) return json(404, { code: 54201, message: "none", status: 404 });
    if (req.method === "POST") return json(201, item("k", req.body.Data, "1"));
  });
  const { client, map } = await open(node, { mutateRetries: 0 });
  assert.deepEqual((await map.mutate("k", () => ({ a: 1 }))).data, { a: 1 });
  await client.shutdown();
});

test("refused before sending: '.' and '..' keys and names, an async mutator", async () => {
  const node = new FakeNode((req) => {
    if (req.method === "GET" && req.path.endsWith("/Items/k")) return json(200, item("k", { n: 1 }, "1"));
  });
  const { client, map } = await open(node);
  node.requests.length = 0;
  await assert.rejects(map.set(".", {}), (e) => e.code === 54209);
  await assert.rejects(map.get(".."), (e) => e.code === 54209);
  await assert.rejects(client.map(".."), (e) => e.code === 54302);
  await assert.rejects(map.mutate("k", async (d) => ({ ...d, a: 1 })), TypeError);
  assert.deepEqual(
    node.requests.map((r) => r.method),
    ["GET"],
    "only the mutate's read went out",
  );
  await client.shutdown();
});

test("shutdown lets a write already sent finish, and refuses what had not been sent", async () => {
  let answer;
  const node = new FakeNode((req) => {
    if (req.method === "POST") return new Promise((r) => (answer = () => r(json(200, item("k", req.body.Data, "r1")))));
  });
  const { client, map } = await open(node);
  const sent = map.set("k", { v: 1 });
  const queued = map.set("k", { v: 2 }); // waits behind the first (same key)
  await until("the first write is out", () => answer);
  const down = client.shutdown();
  answer();
  assert.deepEqual((await sent).data, { v: 1 }, "its answer is not thrown away");
  await assert.rejects(queued, (e) => e.code === 20499);
  await down;
  assert.equal(node.requests.filter((r) => r.method === "POST").length, 1);
});

test("keys compare by code point, as the node lists them", () => {
  assert.equal(compareKeys("a", "b"), -1);
  assert.equal(compareKeys("b", "a"), 1);
  assert.equal(compareKeys("ab", "ab"), 0);
  assert.equal(compareKeys("a", "ab"), -1);
  // U+FFFD sorts before U+1F600 by code point, after it in UTF-16 code units.
  assert.equal(compareKeys("\uFFFD", "😀"), -1);
  assert.ok("\uFFFD" > "😀");
});
