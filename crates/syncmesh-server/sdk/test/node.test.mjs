// The client against real `syncmesh node` processes: the hosted SDK's usage, unchanged but for
// how the client is made; events from other clients and nodes; paging; offline queueing;
// resumption; tokens.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { SyncClient, SyncError } from "../syncmesh.js";
import { startNode, waitFor, trustEachOther } from "./support.mjs";

const nodes = [];
const clients = [];
async function node(args) {
  const n = await startNode(args);
  nodes.push(n);
  return n;
}
function client(...args) {
  const c = new SyncClient(...args);
  clients.push(c);
  return c;
}
after(async () => {
  for (const c of clients) await c.shutdown();
  for (const n of nodes) {
    await n.stop();
    n.cleanup();
  }
});

test("the hosted SDK's seed snippet runs unchanged", async () => {
  const n = await node();
  const syncClient = client({ url: n.url });
  const log = [];
  const console = { log: (...a) => log.push(a), error: (...a) => log.push(["ERROR", ...a]) };
  let done;
  const finished = new Promise((r) => (done = r));
  // --- the snippet, verbatim but for `console` and the final `done` ---
  syncClient.map('users').then(function (map) {
    map.set('david', { phone_number: 12345678, country: 'UK' })
      .then(function (item) { console.log('Added: ', item.key); })
      .catch(function (err) { console.error(err); });
    map.update('david', { country: "IRL" });
    map.mutate('david', function (remoteData) { remoteData.country = "USA"; return remoteData; });
    map.on('itemAdded', function (item) { console.log('key', item.key); console.log('JSON data', item.value); });
    map.on('itemUpdated', function (item) { console.log('key', item.key); console.log('JSON data', item.value); });
    map.getItems().then(function (page) { console.log('show first item', page.items[0].key, page.items[0].value); });
    map.get('david').then(function (item) { console.log(item.value); });
    map.remove('david').then(function () { console.log('item deleted'); });
    map.removeMap().then(function () { console.log('map deleted'); done(); });
  });
  // --- end of snippet ---
  await finished;
  // Events arrive asynchronously: wait for the three item events (added, updated twice).
  await waitFor("the snippet's events", () => log.filter((l) => l[0] === "JSON data").length === 3);
  const usa = { phone_number: 12345678, country: "USA" };
  const direct = log.filter((l) => l[0] !== "key" && l[0] !== "JSON data");
  assert.deepEqual(direct, [
    ["Added: ", "david"],
    ["show first item", "david", usa],
    [usa],
    ["item deleted"],
    ["map deleted"],
  ]);
  assert.deepEqual(
    log.filter((l) => l[0] === "JSON data").map((l) => l[1]),
    [{ phone_number: 12345678, country: "UK" }, { phone_number: 12345678, country: "IRL" }, usa],
  );
  assert.ok(!log.some((l) => l[0] === "ERROR"), JSON.stringify(log));
});

test("current-shape events: item, isLocal, previousItemData; other clients are not local", async () => {
  const n = await node();
  const a = client({ url: n.url });
  const b = client({ url: n.url });
  const mapA = await a.map({ id: "shapes", mode: "create_new" });
  const mapB = await b.map({ id: "shapes", mode: "open_existing" });
  assert.equal(mapA.sid, mapB.sid);
  assert.equal(mapA.uniqueName, "shapes");
  const seenA = [];
  const seenB = [];
  for (const [m, seen] of [[mapA, seenA], [mapB, seenB]]) {
    m.on("itemAdded", (e) => seen.push(["added", e.item.key, e.item.data, e.isLocal, e.key, e.value]));
    m.on("itemUpdated", (e) => seen.push(["updated", e.item.key, e.item.data, e.isLocal, e.previousItemData]));
    m.on("itemRemoved", (e) => seen.push(["removed", e.key, e.isLocal, e.previousItemData]));
    m.on("removed", (e) => seen.push(["map removed", e.isLocal]));
  }
  const item = await mapA.set("k", { v: 1 });
  assert.equal(item.key, "k");
  assert.deepEqual(item.data, { v: 1 });
  assert.deepEqual(item.value, { v: 1 });
  assert.ok(item.dateUpdated instanceof Date);
  await mapB.update("k", { w: 2 });
  await mapA.remove("k");
  await mapB.removeMap();
  await waitFor("four events on each", () => seenA.length === 4 && seenB.length === 4);
  assert.deepEqual(seenA, [
    ["added", "k", { v: 1 }, true, "k", { v: 1 }],
    ["updated", "k", { v: 1, w: 2 }, false, { v: 1 }],
    ["removed", "k", true, { v: 1, w: 2 }],
    ["map removed", false],
  ]);
  assert.deepEqual(seenB, [
    ["added", "k", { v: 1 }, false, "k", { v: 1 }],
    ["updated", "k", { v: 1, w: 2 }, true, { v: 1 }],
    ["removed", "k", false, { v: 1, w: 2 }],
    ["map removed", true],
  ]);
});

test("errors are SyncError with the Sync Maps code and status", async () => {
  const n = await node();
  const c = client({ url: n.url });
  const m = await c.map("errs");
  await assert.rejects(m.get("nope"), (e) => e instanceof SyncError && e.code === 54201 && e.status === 404);
  await assert.rejects(c.map({ id: "missing", mode: "open_existing" }), (e) => e.code === 54200 && e.status === 404);
  await assert.rejects(c.map({ id: "errs", mode: "create_new" }), (e) => e.code === 54301 && e.status === 409);
  await assert.rejects(m.set("big", { s: "x".repeat(17 * 1024) }), (e) => e.code === 54006 && e.status === 413);
  await assert.rejects(m.set("arr", [1, 2]), (e) => e.code === 54206);
  await assert.rejects(m.setItemTtl("nope", 10), (e) => e.code === 54201);
});

test("getItems pages forwards and backwards, in either order, from a key", async () => {
  const n = await node();
  const c = client({ url: n.url });
  const m = await c.map("paged");
  const keys = Array.from({ length: 25 }, (_, i) => `k${String(i).padStart(2, "0")}`);
  await Promise.all(keys.map((k, i) => m.set(k, { i })));
  let page = await m.getItems({ pageSize: 10 });
  const seen = [];
  for (;;) {
    seen.push(...page.items.map((it) => it.key));
    if (!page.hasNextPage) break;
    page = await page.nextPage();
  }
  assert.deepEqual(seen, keys);
  assert.ok(page.hasPrevPage);
  const prev = await page.prevPage();
  assert.deepEqual(prev.items.map((i) => i.key), keys.slice(10, 20));
  await assert.rejects((await m.getItems({ pageSize: 100 })).nextPage(), (e) => e.code === 20400);
  const desc = await m.getItems({ order: "desc", pageSize: 3 });
  assert.deepEqual(desc.items.map((i) => i.key), ["k24", "k23", "k22"]);
  const from = await m.getItems({ from: "k20", pageSize: 100 });
  assert.deepEqual(from.items.map((i) => i.key), keys.slice(20));
  assert.equal(from.items[0].value.i, 20);
});

test("mutate retries on conflicts, with fresh data, and null cancels", async () => {
  const n = await node();
  const a = client({ url: n.url });
  const b = client({ url: n.url });
  const ma = await a.map("counter");
  const mb = await b.map("counter");
  // 2 clients x 15 increments each, racing: every increment lands exactly once.
  const inc = (m) => m.mutate("n", (d) => ({ count: (d.count ?? 0) + 1 }));
  await Promise.all(Array.from({ length: 15 }, () => [inc(ma), inc(mb)]).flat());
  assert.equal((await ma.get("n")).data.count, 30);
  const unchanged = await ma.mutate("n", () => null);
  assert.equal(unchanged.data.count, 30);
  assert.equal(await ma.mutate("absent", () => null), null);
  await assert.rejects(ma.get("absent"), (e) => e.code === 54201);
});

test("ttl on items and maps", async () => {
  const n = await node();
  const c = client({ url: n.url });
  const m = await c.map({ id: "ttls", ttl: 3600 });
  assert.ok(m.dateExpires instanceof Date);
  const it = await m.set("a", { x: 1 }, { ttl: 600 });
  assert.ok(it.dateExpires instanceof Date);
  assert.ok(it.dateExpires.getTime() > Date.now() + 500_000);
  await m.setItemTtl("a", 0);
  assert.equal((await m.get("a")).dateExpires, null);
  await m.setTtl(0);
  assert.equal(m.dateExpires, null);
});

test("events from another node arrive with isLocal false", async () => {
  const a = await node();
  const b = await node();
  // Nodes exchange maps only with peers they trust: B joins A with A's invitation.
  await trustEachOther(a, b);
  const ca = client({ url: a.url });
  const cb = client({ url: b.url });
  const ma = await ca.map("across");
  await ma.set("first", { from: "a" });
  // In B's event feed before B's client subscribes: else "first" is (rightly) an event there
  // too. (The item is readable on B a moment before its event is published, once stored.)
  await waitFor("B holds the first item", async () => (await fetch(`${b.url}/v1/Services/default/Maps/across/Items/first`)).ok);
  await waitForEvent(b.url, "across", "first");
  const mb = await cb.map({ id: "across", mode: "open_existing" });
  const seen = [];
  mb.on("itemAdded", (e) => seen.push([e.item.key, e.isLocal]));
  await ma.set("second", { from: "a" });
  await waitFor("B's client sees A's write", () => seen.length >= 1);
  assert.deepEqual(seen, [["second", false]]);
});

/** Waits until map `map` on the node at `url` has an event about item `key` (its SSE feed from the start). */
async function waitForEvent(url, map, key) {
  const stop = new AbortController();
  const timer = setTimeout(() => stop.abort(), 90_000);
  try {
    const res = await fetch(`${url}/v1/Services/default/Maps/${map}/Events?after=0`, {
      headers: { accept: "text/event-stream" },
      signal: stop.signal,
    });
    assert.equal(res.status, 200);
    const reader = res.body.getReader();
    const text = new TextDecoder();
    let seen = "";
    for (;;) {
      const { value, done } = await reader.read();
      assert.ok(!done, `the event stream ended before an event about ${key}`);
      seen += text.decode(value, { stream: true });
      if (seen.includes(`"item_key":${JSON.stringify(key)}`)) return;
    }
  } finally {
    clearTimeout(timer);
    stop.abort();
  }
}

test("offline: writes wait in order, settle on reconnect; a full queue and shutdown reject", async () => {
  const n = await node();
  const c = client({ url: n.url, maxQueue: 5 });
  const states = [];
  c.on("connectionStateChanged", (s) => states.push(s));
  const m = await c.map("offline");
  const events = [];
  m.on("itemAdded", (e) => events.push([e.item.key, e.isLocal]));
  m.on("itemUpdated", (e) => events.push([e.item.key, e.isLocal]));
  await m.set("before", { n: 0 });
  await n.stop();
  // Writes while the node is down: they wait.
  const p1 = m.set("a", { n: 1 });
  const p2 = m.update("a", { m: 2 });
  const p3 = m.set("b", { n: 3 });
  await waitFor("the client to notice", () => c.connectionState !== "connected");
  const extra = [m.set("d", {}), m.set("e", {})];
  // maxQueue is 5: the sixth waiting operation is refused at once.
  await assert.rejects(m.set("f", {}), (e) => e instanceof SyncError && e.code === 20429);
  // The same data directory again, on the same port.
  const port = new URL(n.url).port;
  const again = await startNode(["--http", `127.0.0.1:${port}`], { dir: n.dir });
  nodes.push(again);
  const [a, , b] = await Promise.all([p1, p2, p3]);
  await Promise.all(extra);
  assert.deepEqual(a.data, { n: 1 });
  assert.deepEqual((await m.get("a")).data, { n: 1, m: 2 });
  assert.deepEqual(b.data, { n: 3 });
  await waitFor("events after reconnecting", () => events.some((e) => e[0] === "e"));
  assert.ok(states.includes("disconnected") && states.at(-1) === "connected", states.join(","));
  // Each write's event once, all local, in call order per key.
  const keys = events.map((e) => e[0]);
  assert.deepEqual(keys.filter((k) => k === "a").length, 2);
  assert.ok(events.every((e) => e[1]), JSON.stringify(events));
  assert.equal(new Set(keys.filter((k) => k !== "a")).size, keys.filter((k) => k !== "a").length);
  // Shutdown rejects what still waits.
  await again.stop();
  await waitFor("the client to notice", () => c.connectionState !== "connected");
  const waiting = m.set("g", {});
  await c.shutdown();
  await assert.rejects(waiting, (e) => e.code === 20499);
});

test("a token: refused without it (denied), works with it", async () => {
  const n = await node(["--token", "s3cret"]);
  const bad = client({ url: n.url, token: "wrong" });
  const denied = new Promise((r) => bad.on("connectionStateChanged", (s) => s === "denied" && r()));
  await denied;
  await assert.rejects(bad.map("x"), (e) => e.code === 20003 && e.status === 401);
  await bad.updateToken("s3cret");
  const m = await bad.map("x");
  const seen = [];
  m.on("itemAdded", (e) => seen.push(e.key));
  await m.set("k", {});
  await waitFor("the event through the token", () => seen.length === 1);
  const good = client("s3cret", { url: n.url });
  assert.deepEqual((await (await good.map("x")).get("k")).data, {});
});

/** A fetch whose next `n` writes reach the node but lose their answer (a dropped connection). */
function losingAnswers() {
  const f = async (url, init = {}) => {
    const res = await fetch(url, init);
    if (f.lose > 0 && init.method && init.method !== "GET") {
      f.lose -= 1;
      await res.text();
      throw new TypeError("fetch failed (the connection dropped before the answer)");
    }
    return res;
  };
  f.lose = 0;
  return f;
}

test("a write whose answer was lost is not applied twice, and its event is local", async () => {
  const n = await node();
  const f = losingAnswers();
  const c = client({ url: n.url, fetch: f });
  const m = await c.map("lost-answers");
  const events = [];
  for (const t of ["itemAdded", "itemUpdated", "itemRemoved"]) {
    m.on(t, (e) => events.push([t, e.key, e.isLocal, JSON.stringify(e.data ?? null)]));
  }
  await m.set("n", { count: 0 });
  // mutate: the increment happens once.
  f.lose = 1;
  const item = await m.mutate("n", (d) => ({ count: d.count + 1 }));
  assert.deepEqual(item.data, { count: 1 });
  assert.deepEqual((await m.get("n")).data, { count: 1 });
  // mutate creating the item.
  f.lose = 1;
  assert.deepEqual((await m.mutate("fresh", (d) => ({ ...d, made: true }))).data, { made: true });
  // set: one write, one event.
  f.lose = 1;
  await m.set("k", { a: 1 });
  // update.
  f.lose = 1;
  await m.update("k", { b: 2 });
  // remove: it did remove the item, so it resolves.
  f.lose = 1;
  await m.remove("k");
  await waitFor("the events", () => events.some((e) => e[0] === "itemRemoved"));
  await new Promise((r) => setTimeout(r, 300)); // anything more would arrive now
  assert.deepEqual(events, [
    ["itemAdded", "n", true, '{"count":0}'],
    ["itemUpdated", "n", true, '{"count":1}'],
    ["itemAdded", "fresh", true, '{"made":true}'],
    ["itemAdded", "k", true, '{"a":1}'],
    ["itemUpdated", "k", true, '{"a":1,"b":2}'],
    ["itemRemoved", "k", true, "null"],
  ]);
  // removeMap likewise.
  const removed = new Promise((r) => m.on("removed", r));
  f.lose = 1;
  await m.removeMap();
  assert.equal((await removed).isLocal, true);
});

test("isLocal stays true for many writes to one key answered before their events arrive", async () => {
  const n = await node();
  let lag = 0;
  // The stream's data arrives late (a buffering proxy, a slow link): the answers come first.
  const f = async (url, init) => {
    const res = await fetch(url, init);
    if (!url.endsWith("/Events")) return res;
    const slow = new TransformStream({
      async transform(chunk, ctrl) {
        if (lag) await new Promise((r) => setTimeout(r, lag));
        ctrl.enqueue(chunk);
      },
    });
    return new Response(res.body.pipeThrough(slow), { status: res.status, headers: res.headers });
  };
  const c = client({ url: n.url, fetch: f });
  const m = await c.map("many-writes");
  const local = [];
  m.on("itemAdded", (e) => local.push(e.isLocal));
  m.on("itemUpdated", (e) => local.push(e.isLocal));
  lag = 1000;
  for (let i = 0; i < 40; i++) await m.set("k", { i });
  await waitFor("40 events", () => local.length === 40);
  assert.deepEqual(local.filter((l) => !l).length, 0);
});

test("a write resolves after its own event was delivered, as with the hosted SDK", async () => {
  const n = await node();
  const c = client({ url: n.url });
  const m = await c.map("own-events");
  const seen = new Map();
  m.on("itemAdded", (e) => seen.set(e.key, ["added", e.isLocal]));
  m.on("itemUpdated", (e) => seen.set(e.key, ["updated", e.isLocal]));
  m.on("itemRemoved", (e) => seen.set(e.key, ["removed", e.isLocal]));
  for (let i = 0; i < 20; i++) {
    const key = `k${i}`;
    await m.set(key, { i });
    assert.deepEqual(seen.get(key), ["added", true], `set ${key}`);
    await m.update(key, { j: i });
    assert.deepEqual(seen.get(key), ["updated", true], `update ${key}`);
    await m.mutate(key, (d) => ({ ...d, k: i }));
    assert.deepEqual(seen.get(key), ["updated", true], `mutate ${key}`);
    seen.delete(key);
    await m.setItemTtl(key, 3600);
    assert.deepEqual(seen.get(key), ["updated", true], `setItemTtl ${key}`);
    await m.remove(key);
    assert.deepEqual(seen.get(key), ["removed", true], `remove ${key}`);
  }
  let removed = false;
  m.on("removed", () => (removed = true));
  await m.removeMap();
  assert.ok(removed, "removeMap resolves after 'removed'");
});

test("the README's JavaScript example runs as written", async () => {
  const { readFileSync, writeFileSync, copyFileSync, mkdtempSync } = await import("node:fs");
  const { join } = await import("node:path");
  const { tmpdir } = await import("node:os");
  const { execFile } = await import("node:child_process");
  const { REPO } = await import("./support.mjs");
  const readme = readFileSync(join(REPO, "README.md"), "utf8");
  const block = readme.match(/```js\n(\/\/ demo\.mjs\n[\s\S]*?)```/);
  assert.ok(block, "the README has the demo.mjs example");
  const n = await node();
  const dir = mkdtempSync(join(tmpdir(), "syncmesh-readme-"));
  copyFileSync(new URL("../syncmesh.js", import.meta.url), join(dir, "syncmesh.js"));
  writeFileSync(join(dir, "demo.mjs"), block[1]);
  const out = await new Promise((resolve, reject) => {
    execFile(process.execPath, ["demo.mjs"], {
      cwd: dir,
      timeout: 90_000,
      env: { ...process.env, SYNCMESH_NODE: n.url },
    }, (err, stdout, stderr) => (err ? reject(new Error(`${err.message}\n${stderr}`)) : resolve(stdout)));
  });
  assert.match(out, /updated david .*IRL.* true/);
  assert.match(out, /country: 'IRL'/);
});

test("getConflicts: none on an item one node wrote; 54201 for a missing item", async () => {
  const n = await node();
  const c = client({ url: n.url });
  const map = await c.map("conflicts");
  await map.set("k", { a: 1 });
  const got = await map.getConflicts("k");
  assert.equal(got.key, "k");
  assert.deepEqual(got.values, []);
  assert.deepEqual(got.fields, {});
  assert.equal(got.writers.length, 1);
  await assert.rejects(map.getConflicts("missing"), (e) => e instanceof SyncError && e.code === 54201);
});

test("snapshot: a mirror of a map being written misses nothing and repeats nothing", async () => {
  const n = await node();
  const writer = client({ url: n.url });
  const reader = client({ url: n.url });
  const mw = await writer.map("mirror");
  const key = (i) => `k${String(i).padStart(4, "0")}`;
  // More than two pages before the snapshot, so its pages are read at different moments.
  for (let i = 0; i < 250; i += 50) {
    await Promise.all(Array.from({ length: 50 }, (_, j) => mw.set(key(i + j), { i: i + j })));
  }
  const mr = await reader.map("mirror");
  const mirror = new Map();
  const problems = [];
  mr.on("itemAdded", (e) => {
    if (mirror.has(e.key)) problems.push(`added twice: ${e.key}`);
    mirror.set(e.key, e.item.revision);
  });
  mr.on("itemUpdated", (e) => {
    if (!mirror.has(e.key)) problems.push(`update of a key not seen: ${e.key}`);
    if (mirror.get(e.key) === e.item.revision) problems.push(`update shown twice: ${e.key}`);
    mirror.set(e.key, e.item.revision);
  });
  mr.on("itemRemoved", (e) => {
    if (!mirror.delete(e.key)) problems.push(`removal of a key not seen: ${e.key}`);
  });
  // Writes go on while the snapshot is read: new keys, updates and removals spread over
  // every page's range.
  const more = (async () => {
    for (let i = 0; i < 150; i++) {
      await Promise.all([
        mw.set(key(250 + i), { i: 250 + i }),
        mw.update(key((i * 7) % 250), { round: i }),
        i % 10 === 0 ? mw.remove(key(i)) : Promise.resolve(),
      ]);
    }
  })();
  const snap = await mr.snapshot();
  for (const it of snap.items) mirror.set(it.key, it.revision);
  assert.ok(Number.isSafeInteger(snap.lastEventId) && snap.lastEventId > 0);
  await more;
  const truth = async () => {
    const out = new Map();
    let page = await mw.getItems({ pageSize: 100 });
    for (;;) {
      for (const it of page.items) out.set(it.key, it.revision);
      if (!page.hasNextPage) return out;
      page = await page.nextPage();
    }
  };
  const final = await truth();
  await waitFor("the mirror matches the map", () => mirror.size === final.size && [...final].every(([k, r]) => mirror.get(k) === r));
  assert.deepEqual(problems, []);
});
