// The inspector page (`/` of every node) in headless Chromium, against real `syncmesh node`
// processes: it loads, follows changes made elsewhere (another node, the HTTP API), refuses bad
// JSON without writing, works from the keyboard, shares maps (invite, join, trust, untrust), and
// sits behind the node's token.
//
// Needs Debian's /usr/bin/chromium (or $SYNCMESH_CHROMIUM) and playwright-core (`npm install`
// here). Without them the tests are skipped, unless SYNCMESH_REQUIRE_BROWSER=1 (CI), where that
// is a failure. Screenshots of each scenario go to <repo>/target/test-artifacts/inspector-*.png.
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import { startNode, nodeStatus, waitFor, trustEachOther, REPO, DEADLINE_MS } from "./support.mjs";

const P = "/v1/Services/default";
const CHROMIUM = process.env.SYNCMESH_CHROMIUM || "/usr/bin/chromium";
const REQUIRED = process.env.SYNCMESH_REQUIRE_BROWSER === "1";
const ARTIFACTS = join(REPO, "target", "test-artifacts");

let chromium = null;
let missing = null;
try {
  ({ chromium } = await import("playwright-core"));
} catch (e) {
  missing = `playwright-core is not installed (run npm install in crates/syncmesh-server/sdk): ${e.message}`;
}
if (!missing && !existsSync(CHROMIUM)) missing = `no Chromium at ${CHROMIUM} (apt-get install chromium, or set SYNCMESH_CHROMIUM)`;
if (missing && !REQUIRED) console.log(`# browser tests skipped: ${missing}`);

// ------------------------------------------------------------------------------- helpers

/** A JSON request to a node; resolves `{status, body}`. */
async function api(node, method, path, body, token) {
  const headers = {};
  if (body !== undefined) headers["content-type"] = "application/json";
  if (token) headers.authorization = `Bearer ${token}`;
  const r = await fetch(`${node.url}${P}${path}`, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.text();
  return { status: r.status, body: text ? JSON.parse(text) : null };
}

async function createMap(node, name, token) {
  const r = await api(node, "POST", "/Maps", { UniqueName: name }, token);
  assert.ok(r.status === 201 || r.status === 409, `creating map ${name}: ${r.status} ${JSON.stringify(r.body)}`);
  const m = await api(node, "GET", `/Maps/${encodeURIComponent(name)}`, undefined, token);
  assert.equal(m.status, 200);
  return m.body;
}

async function setItem(node, map, key, data, token) {
  const r = await api(node, "POST", `/Maps/${encodeURIComponent(map)}/Items/${encodeURIComponent(key)}`, { Data: data }, token);
  assert.equal(r.status, 200, JSON.stringify(r.body));
  return r.body;
}

function screenshotPath(name) {
  mkdirSync(ARTIFACTS, { recursive: true });
  return join(ARTIFACTS, `inspector-${name}.png`);
}

/**
 * A fresh browser context and page, recording what went wrong in it: console errors, uncaught
 * exceptions, failed requests and error answers (all of which a test expects none of).
 */
async function openPage(browser, { colorScheme = "light" } = {}) {
  const context = await browser.newContext({ viewport: { width: 1440, height: 900 }, colorScheme });
  context.setDefaultTimeout(DEADLINE_MS);
  const page = await context.newPage();
  const problems = [];
  const writes = [];
  page.on("console", (m) => {
    if (m.type() === "error") problems.push(`console error: ${m.text()}`);
  });
  page.on("pageerror", (e) => problems.push(`uncaught: ${e.message}`));
  page.on("requestfailed", (r) => {
    // The client cancels requests itself (a stream it stops, a probe body it does not read);
    // anything else that fails is a problem.
    if (r.failure()?.errorText === "net::ERR_ABORTED") return;
    problems.push(`request failed: ${r.method()} ${r.url()} ${r.failure()?.errorText}`);
  });
  page.on("response", (r) => {
    if (r.status() >= 400) problems.push(`HTTP ${r.status()}: ${r.request().method()} ${r.url()}`);
  });
  page.on("request", (r) => {
    if (["POST", "PATCH", "PUT", "DELETE"].includes(r.method())) writes.push(`${r.method()} ${r.url()}`);
  });
  // On a failure, the page as it was is kept beside the screenshots.
  const failed = async (name, e) => {
    await page.screenshot({ animations: "disabled", path: screenshotPath(`${name}-failure`) }).catch(() => {});
    throw e;
  };
  return { context, page, problems, writes, failed };
}

/** Waits until the text of `selector` (the first match) satisfies `test`; returns it. */
async function waitText(page, selector, test, what = selector) {
  let last;
  await waitFor(`${what} (last seen: ${JSON.stringify(last)})`, async () => {
    last = await page.locator(selector).first().textContent({ timeout: 1000 }).catch(() => null);
    return last !== null && test(last);
  });
  return last;
}

/** Waits until `fn` evaluated in the page is truthy. */
async function waitIn(page, what, fn, arg) {
  return waitFor(what, () => page.evaluate(fn, arg));
}

const rowSel = (key) => `#items tr[data-key="${key}"]`;

/** Opens the inspector of `node` on map `sid` and waits until its items are listed. */
async function openInspector(page, node, sid) {
  await page.goto(`${node.url}/${sid ? `#/maps/${encodeURIComponent(sid)}` : ""}`);
  await waitIn(page, "the client connected", () => document.querySelector("#connection")?.dataset.state === "connected");
  if (sid) {
    await page.locator("#map-view").waitFor({ state: "visible" });
    await waitText(page, "#items-summary", (t) => /page \d/.test(t), "the first page of items");
  }
}

async function activeId(page) {
  return page.evaluate(() => document.activeElement?.id || document.activeElement?.tagName);
}

// ------------------------------------------------------------------------------- the tests

describe("inspector page in headless Chromium", { skip: missing && !REQUIRED ? missing : false }, () => {
  let browser;
  const nodes = [];

  async function node(args = []) {
    const n = await startNode(args);
    nodes.push(n);
    return n;
  }

  before(async () => {
    if (missing) throw new Error(`SYNCMESH_REQUIRE_BROWSER=1 but ${missing}`);
    // launch() runs Chromium on a fresh temporary profile of its own.
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      timeout: DEADLINE_MS,
      args: [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
    });
  });

  after(async () => {
    await browser?.close();
    for (const n of nodes) {
      await n.stop();
      n.cleanup();
    }
  });

  test("the page loads: identity, maps, items, no console errors or failed requests", async () => {
    const a = await node();
    const status = await nodeStatus(a.url);
    const users = await createMap(a, "users");
    await createMap(a, "orders");
    for (const [key, data] of [
      ["alice", { phone_number: 5550101, country: "UK", active: true }],
      ["bob", { phone_number: 5550102, country: "FR", tags: ["admin", "ops"] }],
      ["carol", { phone_number: 5550103, country: "IRL", address: { city: "Cork" } }],
    ]) {
      await setItem(a, "users", key, data);
    }
    const { context, page, problems, failed } = await openPage(browser);
    try {
      await openInspector(page, a);
      assert.match(await page.title(), /syncmesh/);
      await waitText(page, "#node-id", (t) => t === status.node_id, "the node id");
      await waitText(page, "#peer-id", (t) => t === status.peer_id, "the peer id");
      await waitText(page, "#node-version", (t) => t.includes(status.version), "the version");
      await page.locator(`#listen-addrs li[data-addr="${status.listen_addrs[0]}"]`).waitFor();
      await waitText(page, "#maps", (t) => t.includes("users") && t.includes("orders"), "both maps listed");
      // Open a map from the list; its items appear, the address bar can be bookmarked.
      await page.locator(`#maps a[data-sid="${users.sid}"]`).click();
      await page.locator(rowSel("carol")).waitFor();
      assert.equal(await page.locator("#items tr").count(), 3);
      assert.equal(await page.evaluate(() => location.hash), `#/maps/${users.sid}`);
      await waitText(page, "#map-title", (t) => t === "users");
      await waitText(page, `${rowSel("bob")} .data-preview`, (t) => t.includes('"admin"'), "bob's data");
      await page.screenshot({ animations: "disabled", path: screenshotPath("load") });
      // The bookmark opens the map directly, in the dark scheme too.
      const dark = await openPage(browser, { colorScheme: "dark" });
      try {
        await openInspector(dark.page, a, users.sid);
        await dark.page.locator(rowSel("alice")).waitFor();
        await dark.page.screenshot({ animations: "disabled", path: screenshotPath("load-dark") });
        assert.deepEqual(dark.problems, []);
      } catch (e) {
        await dark.failed("load-dark", e);
      } finally {
        await dark.context.close();
      }
      assert.deepEqual(problems, []);
    } catch (e) {
      await failed("load", e);
    } finally {
      await context.close();
    }
  });

  test("an item added through one node's page appears on another node's page", async () => {
    const a = await node();
    const b = await node();
    // Nodes exchange maps only with peers they trust: B joins A with A's invitation (the
    // peers panel's own test does this through the pages).
    await trustEachOther(a, b);
    // Both nodes hold the map (a unique name is the same map on every node).
    const onA = await createMap(a, "chat");
    const onB = await createMap(b, "chat");
    assert.equal(onA.sid, onB.sid);
    const pa = await openPage(browser);
    const pb = await openPage(browser);
    try {
      await openInspector(pa.page, a, onA.sid);
      await openInspector(pb.page, b, onB.sid);
      await waitText(pb.page, "#peer-count", (t) => t === "1", "B's page shows its peer");
      // Add through A's form.
      await pa.page.locator("#new-item-button").click();
      await pa.page.locator("#item-dialog").waitFor({ state: "visible" });
      await pa.page.fill("#item-key", "hello");
      await pa.page.fill("#item-data", '{"text": "hi from A", "n": 1}');
      await pa.page.click("#item-save");
      await pa.page.locator("#item-dialog").waitFor({ state: "hidden" });
      await pa.page.locator(rowSel("hello")).waitFor();
      await waitText(pa.page, "#events li", (t) => t.includes("hello") && t.includes("local"), "A's own event, local");
      // It reaches B's page through replication, as a remote event.
      await pb.page.locator(rowSel("hello")).waitFor();
      await waitText(pb.page, `${rowSel("hello")} .data-preview`, (t) => t.includes("hi from A"), "the data on B");
      await waitText(pb.page, "#events li", (t) => t.includes("hello") && t.includes("remote"), "B's event, remote");
      assert.equal(await pb.page.locator('#events li[data-key="hello"]').first().getAttribute("data-local"), "false");
      const onNodeB = await api(b, "GET", `/Maps/chat/Items/hello`);
      assert.deepEqual(onNodeB.body.data, { text: "hi from A", n: 1 });
      await pb.page.screenshot({ animations: "disabled", path: screenshotPath("replicated") });
      assert.deepEqual(pa.problems, []);
      assert.deepEqual(pb.problems, []);
    } catch (e) {
      await pa.page.screenshot({ animations: "disabled", path: screenshotPath("replicated-a-failure") }).catch(() => {});
      await pb.failed("replicated-b", e);
    } finally {
      await pa.context.close();
      await pb.context.close();
    }
  });

  test("the peers panel: an invitation made on A's page, joined on B's page; trusted both ways, an item replicates, untrust asks first", async () => {
    const a = await node();
    const b = await node();
    const [sa, sb] = [await nodeStatus(a.url), await nodeStatus(b.url)];
    const shared = await createMap(a, "shared");
    await createMap(b, "shared");
    await setItem(a, "shared", "before", { from: "a" });
    const pa = await openPage(browser);
    const pb = await openPage(browser);
    const trustedRow = (id) => `#trusted-peers li[data-peer-id="${id}"]`;
    try {
      await openInspector(pa.page, a);
      await openInspector(pb.page, b);
      // Closed by default: nobody is trusted, and nothing of A's reached B.
      await waitText(pa.page, "#trusted-count", (t) => t === "0", "no trusted peers on A");
      await pa.page.locator("#trusted-peers li.none").waitFor();
      assert.equal((await api(b, "GET", "/Maps/shared/Items/before")).status, 404);
      // A: the invitation form (one map), and its ticket.
      await pa.page.locator("#invite-button").click();
      await pa.page.locator("#invite-dialog").waitFor({ state: "visible" });
      await waitIn(pa.page, "the maps field focused", () => document.activeElement?.id === "invite-maps");
      await pa.page.keyboard.type("shared");
      await pa.page.fill("#invite-uses", "0");
      await pa.page.click("#invite-create");
      await waitText(pa.page, "#invite-error", (t) => /Uses/.test(t), "the uses refused on the page");
      await pa.page.fill("#invite-uses", "1");
      await pa.page.click("#invite-create");
      await pa.page.locator("#invite-result").waitFor({ state: "visible" });
      const ticket = await pa.page.inputValue("#invite-ticket");
      assert.match(ticket, /^smt1[a-z2-7]+$/);
      await waitText(pa.page, "#invite-summary", (t) => t.includes("1 map") && t.includes("read and write"), "the invitation's scope");
      await pa.page.screenshot({ animations: "disabled", path: screenshotPath("peers-invite") });
      await pa.page.keyboard.press("Escape");
      await pa.page.locator("#invite-dialog").waitFor({ state: "hidden" });
      // B: the join form, from the keyboard. Something that is not a ticket is refused
      // without a request; the ticket joins.
      await pb.page.locator("#join-button").focus();
      await pb.page.keyboard.press("Enter");
      await pb.page.locator("#join-dialog").waitFor({ state: "visible" });
      await waitIn(pb.page, "the ticket field focused", () => document.activeElement?.id === "join-ticket");
      await pb.page.keyboard.type("not a ticket");
      await pb.page.keyboard.press("Enter");
      await waitText(pb.page, "#join-error", (t) => /not a ticket/.test(t), "the refusal");
      assert.ok(!pb.writes.some((w) => w.includes("/v1/Node/Join")), "nothing was sent");
      await pb.page.fill("#join-ticket", ticket);
      await pb.page.keyboard.press("Enter");
      await pb.page.locator("#join-dialog").waitFor({ state: "hidden" });
      // Both pages list the other as trusted and connected, with how and what.
      await pb.page.locator(`${trustedRow(sa.peer_id)}[data-connected="true"]`).waitFor();
      await pa.page.locator(`${trustedRow(sb.peer_id)}[data-connected="true"]`).waitFor();
      assert.equal(await pa.page.getAttribute(trustedRow(sb.peer_id), "data-source"), "invited");
      assert.equal(await pb.page.getAttribute(trustedRow(sa.peer_id), "data-source"), "joined");
      await waitText(pa.page, trustedRow(sb.peer_id), (t) => t.includes("1 map") && t.includes("connected"), "B's scope on A");
      await waitText(pa.page, "#trusted-count", (t) => t === "1");
      await waitText(pb.page, "#peer-count", (t) => t === "1", "B's page counts its connected peer");
      await pa.page.screenshot({ animations: "disabled", path: screenshotPath("peers-trusted") });
      // The shared map replicates: the item from before, then one written now.
      await pb.page.locator(`#maps a[data-sid="${shared.sid}"]`).click();
      await pb.page.locator(rowSel("before")).waitFor();
      await setItem(a, "shared", "after", { from: "a" });
      await pb.page.locator(rowSel("after")).waitFor();
      // Untrusting asks first (the safe choice focused); cancelling keeps the peer.
      const untrust = `${trustedRow(sa.peer_id)} button[data-action="untrust"]`;
      await pb.page.locator(untrust).click();
      await pb.page.locator("#confirm-dialog").waitFor({ state: "visible" });
      await waitIn(pb.page, "the safe choice focused", () => document.activeElement?.id === "confirm-cancel");
      await waitText(pb.page, "#confirm-text", (t) => t.includes(sa.peer_id));
      await pb.page.keyboard.press("Escape");
      await pb.page.locator("#confirm-dialog").waitFor({ state: "hidden" });
      assert.equal((await nodeStatus(b.url)).trusted_peers.length, 1, "still trusted after cancelling");
      await pb.page.locator(untrust).click();
      await pb.page.locator("#confirm-ok").click();
      await pb.page.locator(trustedRow(sa.peer_id)).waitFor({ state: "detached" });
      assert.deepEqual((await nodeStatus(b.url)).trusted_peers, []);
      // Trusting by id is a deliberate form: B trusts A again by its id.
      await pb.page.locator("#trust-button").click();
      await pb.page.locator("#trust-dialog").waitFor({ state: "visible" });
      await pb.page.fill("#trust-peer-id", sb.peer_id);
      await pb.page.click("#trust-submit");
      await waitText(pb.page, "#trust-error", (t) => /own peer id/.test(t), "its own id refused");
      await pb.page.fill("#trust-peer-id", sa.peer_id);
      await pb.page.click("#trust-submit");
      await pb.page.locator("#trust-dialog").waitFor({ state: "hidden" });
      await pb.page.locator(`${trustedRow(sa.peer_id)}[data-source="manual"][data-connected="true"]`).waitFor();
      await setItem(a, "shared", "again", { from: "a" });
      await pb.page.locator(rowSel("again")).waitFor();
      await pb.page.screenshot({ animations: "disabled", path: screenshotPath("peers-manual") });
      assert.deepEqual(pa.problems, []);
      assert.deepEqual(pb.problems, []);
    } catch (e) {
      await pa.page.screenshot({ animations: "disabled", path: screenshotPath("peers-a-failure") }).catch(() => {});
      await pb.failed("peers-b", e);
    } finally {
      await pa.context.close();
      await pb.context.close();
    }
  });

  test("an edit through the HTTP API appears live in the items table and the event log", async () => {
    const a = await node();
    const m = await createMap(a, "live");
    await setItem(a, "live", "david", { phone_number: 12345678, country: "UK" });
    const { context, page, problems, failed } = await openPage(browser);
    try {
      await openInspector(page, a, m.sid);
      await page.locator(rowSel("david")).waitFor();
      // POST (set) a new item, then PATCH (update) it, then remove another: all without reload.
      await setItem(a, "live", "eve", { country: "FR" });
      await page.locator(rowSel("eve")).waitFor();
      const patched = await api(a, "PATCH", "/Maps/live/Items/david", { Data: { country: "IRL" } });
      assert.equal(patched.status, 200);
      await waitText(page, `${rowSel("david")} .data-preview`, (t) => t.includes('"IRL"') && t.includes("12345678"), "david's new data");
      await waitText(page, "#events li", (t) => t.includes("updated") && t.includes("david") && t.includes("IRL"), "the update event");
      const log = await page.locator("#events li").allTextContents();
      assert.ok(log.some((t) => t.includes("added") && t.includes("eve")), log.join("\n"));
      // The HTTP API is another client: its changes are not local to the page.
      const origins = await page.locator("#events li").evaluateAll((lis) => lis.map((li) => li.dataset.local));
      assert.deepEqual([...new Set(origins)], ["false"]);
      // Newest on top.
      assert.equal(await page.locator("#events li").first().getAttribute("data-type"), "itemUpdated");
      assert.equal(await page.locator("#event-count").textContent(), "2");
      await page.screenshot({ animations: "disabled", path: screenshotPath("live-edit") });
      assert.equal((await api(a, "DELETE", "/Maps/live/Items/eve")).status, 204);
      await page.locator(rowSel("eve")).waitFor({ state: "detached" });
      await waitText(page, "#events li", (t) => t.includes("removed") && t.includes("eve"), "the removal event");
      assert.equal(await page.evaluate(() => location.hash), `#/maps/${m.sid}`, "no navigation happened");
      // Keys and data come from peers: markup in them is shown as text, never interpreted.
      const hostile = '<img src=x onerror="window.pwned=1"><b>bold</b> "q" /a%2F';
      await setItem(a, "live", hostile, { html: "<script>window.pwned=2</script><i>x</i>" });
      await waitIn(page, "the hostile key's row", (k) => [...document.querySelectorAll("#items tr")].some((tr) => tr.dataset.key === k), hostile);
      assert.equal(await page.locator("#items img, #items b, #items i, #items script, #events img, #events b").count(), 0);
      assert.equal(await page.evaluate(() => window.pwned), undefined);
      await waitText(page, "#items", (t) => t.includes(hostile), "the key shown as text");
      assert.deepEqual(problems, []);
    } catch (e) {
      await failed("live-edit", e);
    } finally {
      await context.close();
    }
  });

  test("invalid JSON or a non-object in the form is refused with a message, nothing is written", async () => {
    const a = await node();
    const m = await createMap(a, "forms");
    const kept = await setItem(a, "forms", "keep", { a: 1 });
    const { context, page, writes, failed } = await openPage(browser);
    try {
      await openInspector(page, a, m.sid);
      await page.locator(rowSel("keep")).waitFor();
      const dialog = page.locator("#item-dialog");
      const error = page.locator("#item-data-error");
      // Adding: malformed JSON, then an array, then a string.
      await page.locator("#new-item-button").click();
      await dialog.waitFor({ state: "visible" });
      await page.fill("#item-key", "bad");
      for (const [text, expected] of [
        ['{"a": 1,', /not valid JSON/],
        ["[1, 2, 3]", /must be a JSON object.*array/],
        ['"just a string"', /must be a JSON object.*string/],
        ["null", /must be a JSON object.*null/],
      ]) {
        await page.fill("#item-data", text);
        await page.click("#item-save");
        await error.waitFor({ state: "visible" });
        await waitText(page, "#item-data-error", (t) => expected.test(t), `the message for ${text}`);
        assert.equal(await page.locator("#item-data").getAttribute("aria-invalid"), "true");
        assert.ok(await dialog.isVisible(), "the form stays open");
      }
      await page.fill("#item-data", "[1, 2, 3]");
      await page.click("#item-save");
      await waitText(page, "#item-data-error", (t) => /array/.test(t));
      await page.screenshot({ animations: "disabled", path: screenshotPath("invalid-json") });
      await page.keyboard.press("Escape");
      await dialog.waitFor({ state: "hidden" });
      assert.equal((await api(a, "GET", "/Maps/forms/Items/bad")).status, 404, "the refused item was not written");
      // Editing: the key button opens the item; bad data is refused and the item is unchanged.
      await page.locator(`${rowSel("keep")} .key-button`).click();
      await dialog.waitFor({ state: "visible" });
      assert.equal(JSON.parse(await page.inputValue("#item-data")).a, 1);
      assert.equal(await page.locator("#item-key").getAttribute("readonly"), "");
      for (const [text, expected] of [
        ['{"a": 2', /not valid JSON/],
        ["42", /must be a JSON object.*number/],
        ['[{"a": 2}]', /must be a JSON object.*array/],
      ]) {
        await page.fill("#item-data", text);
        await page.locator("#item-data").press("Control+Enter");
        await waitText(page, "#item-data-error", (t) => expected.test(t), `the message for ${text}`);
      }
      await page.keyboard.press("Escape");
      await dialog.waitFor({ state: "hidden" });
      const after = await api(a, "GET", "/Maps/forms/Items/keep");
      assert.deepEqual(after.body.data, { a: 1 });
      assert.equal(after.body.revision, kept.revision, "the item is unchanged");
      assert.deepEqual(writes, [], "the page sent no write");
      // A valid edit does go through (the form is not simply broken).
      await page.locator(`${rowSel("keep")} .key-button`).click();
      await page.fill("#item-data", '{"a": 2}');
      await page.click("#item-save");
      await dialog.waitFor({ state: "hidden" });
      await waitFor("the edit on the node", async () => (await api(a, "GET", "/Maps/forms/Items/keep")).body.data.a === 2);
    } catch (e) {
      await failed("invalid-json", e);
    } finally {
      await context.close();
    }
  });

  test("keyboard: Enter opens a map, / focuses search, n opens the form, Esc closes it, ? shows shortcuts", async () => {
    const a = await node();
    const m = await createMap(a, "keys");
    for (const key of ["apple", "apricot", "banana", "cherry"]) await setItem(a, "keys", key, { fruit: key });
    const { context, page, problems, failed } = await openPage(browser);
    try {
      await openInspector(page, a);
      await page.locator(`#maps a[data-sid="${m.sid}"]`).waitFor();
      // Tab to the map link, Enter opens it.
      let reached = false;
      for (let i = 0; i < 30 && !reached; i++) {
        await page.keyboard.press("Tab");
        reached = await page.evaluate((sid) => document.activeElement?.dataset?.sid === sid, m.sid);
      }
      assert.ok(reached, "the map link is reachable with Tab");
      const ring = await page.evaluate(() => getComputedStyle(document.activeElement).outlineStyle);
      assert.notEqual(ring, "none", "the focused link shows a focus ring");
      await page.keyboard.press("Enter");
      await page.locator(rowSel("cherry")).waitFor();
      assert.equal(await page.evaluate(() => location.hash), `#/maps/${m.sid}`);
      // '/' focuses the key search; typing filters by prefix; Esc clears it.
      await page.keyboard.press("/");
      await waitIn(page, "the search focused", () => document.activeElement?.id === "search");
      await page.keyboard.type("ap");
      await waitIn(page, "only the keys starting with ap", () => {
        const keys = [...document.querySelectorAll("#items tr")].map((tr) => tr.dataset.key);
        return keys.join(",") === "apple,apricot";
      });
      await page.keyboard.press("ArrowDown");
      assert.equal(await page.evaluate(() => document.activeElement.closest("tr")?.dataset.key), "apple");
      await page.keyboard.press("ArrowDown");
      assert.equal(await page.evaluate(() => document.activeElement.closest("tr")?.dataset.key), "apricot");
      // Enter on an item opens it in the form; Esc closes the form and returns focus.
      await page.keyboard.press("Enter");
      await page.locator("#item-dialog").waitFor({ state: "visible" });
      await waitText(page, "#item-dialog-title", (t) => t.includes("apricot"));
      await page.keyboard.press("Escape");
      await page.locator("#item-dialog").waitFor({ state: "hidden" });
      await waitIn(page, "focus back on apricot", () => document.activeElement?.closest("tr")?.dataset.key === "apricot");
      await page.locator("#search").focus();
      await page.keyboard.press("Escape");
      await waitIn(page, "all keys again", () => document.querySelectorAll("#items tr").length === 4);
      await page.keyboard.press("Escape"); // an empty search: Esc leaves it
      assert.notEqual(await activeId(page), "search");
      // 'n' opens the new-item form with the key field focused; Esc closes it, nothing written.
      await page.keyboard.press("n");
      await page.locator("#item-dialog").waitFor({ state: "visible" });
      await waitIn(page, "the key field focused", () => document.activeElement?.id === "item-key");
      await page.keyboard.type("typed");
      await page.keyboard.press("Escape");
      await page.locator("#item-dialog").waitFor({ state: "hidden" });
      // (A person cannot press the next key before the page has moved focus back out of the
      // closed form; a test can, so it waits for that.)
      await waitIn(page, "focus back on the page", () => !document.activeElement?.closest("dialog"));
      assert.equal((await api(a, "GET", "/Maps/keys/Items/typed")).status, 404);
      // An item can be added from the keyboard alone: n, key, Tab to the data, Ctrl+Enter.
      await page.keyboard.press("n");
      await page.locator("#item-dialog").waitFor({ state: "visible" });
      await waitIn(page, "the key field focused", () => document.activeElement?.id === "item-key");
      await page.keyboard.type("date");
      await page.keyboard.press("Tab");
      assert.equal(await activeId(page), "item-data", "Tab goes from the key to the data");
      await page.keyboard.press("Control+A");
      await page.keyboard.type('{"fruit": "date"}');
      await page.keyboard.press("Control+Enter");
      await page.locator("#item-dialog").waitFor({ state: "hidden" });
      await page.locator(rowSel("date")).waitFor();
      // '?' lists the shortcuts.
      await page.keyboard.press("?");
      await page.locator("#shortcuts-dialog").waitFor({ state: "visible" });
      await page.screenshot({ animations: "disabled", path: screenshotPath("shortcuts") });
      await page.keyboard.press("Escape");
      await page.locator("#shortcuts-dialog").waitFor({ state: "hidden" });
      assert.deepEqual(problems, []);
    } catch (e) {
      await failed("keyboard", e);
    } finally {
      await context.close();
    }
  });

  test("maps and items managed from the page: create a map, page and search, remove after confirming", async () => {
    const a = await node();
    const { context, page, problems, failed } = await openPage(browser);
    const keys = () => page.locator("#items tr").evaluateAll((trs) => trs.map((tr) => tr.dataset.key).join(","));
    const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => `sku-${String(from + i).padStart(2, "0")}`).join(",");
    try {
      await openInspector(page, a);
      // A map from the form, with a unique name; the page opens it.
      await page.locator("#new-map-button").click();
      await page.fill("#new-map-name", "inventory");
      await page.fill("#new-map-ttl", "3600");
      await page.locator("#new-map-form button[type=submit]").click();
      await waitText(page, "#map-title", (t) => t === "inventory", "the new map open");
      const made = await api(a, "GET", "/Maps/inventory");
      assert.equal(made.status, 200);
      assert.ok(made.body.date_expires, "the TTL was sent");
      assert.equal(await page.evaluate(() => location.hash), `#/maps/${made.body.sid}`);
      await page.locator(`#maps a[data-sid="${made.body.sid}"][aria-current="page"]`).waitFor();
      // Items written elsewhere arrive live; then pages of 10, forward and back.
      for (let i = 0; i < 30; i++) await setItem(a, "inventory", `sku-${String(i).padStart(2, "0")}`, { stock: i });
      await waitIn(page, "30 live rows", () => document.querySelectorAll("#items tr").length === 30);
      await page.selectOption("#page-size", "10");
      await waitFor("page 1", async () => (await keys()) === range(0, 9));
      await page.locator("#next-page").click();
      await waitFor("page 2", async () => (await keys()) === range(10, 19));
      await page.keyboard.press("]");
      await waitFor("page 3", async () => (await keys()) === range(20, 29));
      await page.locator("#prev-page").click();
      await waitFor("back to page 2", async () => (await keys()) === range(10, 19));
      // A prefix search stops at the first key without the prefix.
      await page.fill("#search", "sku-2");
      await waitFor("the sku-2 keys", async () => (await keys()) === range(20, 29));
      await waitIn(page, "no next page after the matches", () => document.querySelector("#next-page").disabled);
      await waitText(page, "#items-summary", (t) => t.includes("sku-2"));
      // Removing an item asks first; cancelling keeps it.
      await page.locator(`${rowSel("sku-25")} [data-action=remove]`).click();
      await page.locator("#confirm-dialog").waitFor({ state: "visible" });
      await waitIn(page, "the safe choice focused", () => document.activeElement?.id === "confirm-cancel");
      await page.keyboard.press("Escape");
      await page.locator("#confirm-dialog").waitFor({ state: "hidden" });
      assert.equal((await api(a, "GET", "/Maps/inventory/Items/sku-25")).status, 200);
      await page.locator(`${rowSel("sku-25")} [data-action=remove]`).click();
      await page.locator("#confirm-ok").click();
      await page.locator(rowSel("sku-25")).waitFor({ state: "detached" });
      assert.equal((await api(a, "GET", "/Maps/inventory/Items/sku-25")).status, 404);
      await waitText(page, "#events li", (t) => t.includes("removed") && t.includes("sku-25") && t.includes("local"), "the page's own removal");
      // Removing the map, after confirming.
      await page.locator("#remove-map-button").click();
      await waitText(page, "#confirm-text", (t) => t.includes("inventory"));
      await page.screenshot({ animations: "disabled", path: screenshotPath("remove-map") });
      await page.locator("#confirm-ok").click();
      await waitText(page, "#welcome-title", (t) => t === "Map removed");
      assert.equal((await api(a, "GET", "/Maps/inventory")).status, 404);
      await page.locator(`#maps a[data-sid="${made.body.sid}"]`).waitFor({ state: "detached" });
      assert.deepEqual(problems, []);
    } catch (e) {
      await failed("manage", e);
    } finally {
      await context.close();
    }
  });

  test("an app on another origin (--cors-origin) runs the hosted SDK's snippet with the served client", async () => {
    // The app's own server, on another port: it serves one page that imports the client from
    // the node, as an app moving from the hosted SDK would.
    const { createServer } = await import("node:http");
    let nodeUrl = "";
    const app = createServer((req, res) => {
      res.writeHead(200, { "content-type": "text/html; charset=utf-8" });
      res.end(`<!doctype html><title>app</title><pre id="log"></pre><script type="module">
        import { SyncClient } from "${nodeUrl}/sdk/syncmesh.js";
        const out = [];
        const console = { log: (...a) => out.push(a), error: (...a) => out.push(["ERROR", String(a[0])]) };
        const syncClient = new SyncClient({ url: "${nodeUrl}", token: "app-token" });
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
          map.removeMap().then(function () { console.log('map deleted'); });
        });
        window.snippetLog = out;
      </script>`);
    });
    await new Promise((r) => app.listen(0, "127.0.0.1", r));
    const origin = `http://127.0.0.1:${app.address().port}`;
    const n = await node(["--token", "app-token", "--cors-origin", origin]);
    nodeUrl = n.url;
    const { context, page, problems, failed } = await openPage(browser);
    try {
      await page.goto(`${origin}/`);
      await waitIn(page, "the snippet's output", () => (window.snippetLog ?? []).filter((l) => l[0] === "JSON data").length === 3 && window.snippetLog.some((l) => l[0] === "map deleted"));
      const log = await page.evaluate(() => window.snippetLog);
      const usa = { phone_number: 12345678, country: "USA" };
      assert.ok(!log.some((l) => l[0] === "ERROR"), JSON.stringify(log));
      // `map('users')` opens or creates: looking the map up before it exists is a 404, which
      // the browser logs. That one is expected; nothing else may fail.
      const expected404 = [`HTTP 404: GET ${n.url}${P}/Maps/users`, "console error: Failed to load resource: the server responded with a status of 404 (Not Found)"];
      assert.deepEqual(problems.filter((p) => !expected404.includes(p)), []);
      assert.deepEqual(log.filter((l) => l[0] !== "key" && l[0] !== "JSON data"), [
        ["Added: ", "david"],
        ["show first item", "david", usa],
        [usa],
        ["item deleted"],
        ["map deleted"],
      ]);
    } catch (e) {
      await failed("cross-origin", e);
    } finally {
      await context.close();
      await new Promise((r) => app.close(r));
    }
  });

  test("with --token, / needs the token; /?access_token= opens a working page", async () => {
    const token = "secret";
    const a = await node(["--token", token]);
    const m = await createMap(a, "private", token);
    await setItem(a, "private", "secret-item", { hidden: true }, token);
    const bare = await fetch(`${a.url}/`, { redirect: "manual" });
    assert.equal(bare.status, 401);
    const page401 = await bare.text();
    assert.ok(!page401.includes("secret-item") && !page401.includes('content="secret"'), "the refusal holds neither data nor token");
    const wrong = await fetch(`${a.url}/?access_token=wrong`, { redirect: "manual" });
    assert.equal(wrong.status, 401);
    const refusal = await openPage(browser);
    try {
      const refused = await refusal.page.goto(`${a.url}/`);
      assert.equal(refused.status(), 401);
      await refusal.page.locator("input#access_token").waitFor();
      await refusal.page.screenshot({ animations: "disabled", path: screenshotPath("token-refused") });
      // Signing in through the form: the token never appears in an address.
      await refusal.page.locator("input#access_token").fill(token);
      await refusal.page.locator("input#access_token").press("Enter");
      await waitIn(refusal.page, "the page after signing in", () => document.querySelector("#connection")?.dataset.state === "connected");
      assert.ok(!refusal.page.url().includes(token), refusal.page.url());
    } finally {
      await refusal.context.close();
    }
    const { context, page, problems, failed } = await openPage(browser);
    try {
      await page.goto(`${a.url}/?access_token=${token}`);
      assert.equal(new URL(page.url()).search, "", "the token left the address bar");
      await waitIn(page, "the client connected", () => document.querySelector("#connection")?.dataset.state === "connected");
      await page.locator(`#maps a[data-sid="${m.sid}"]`).click();
      await page.locator(rowSel("secret-item")).waitFor();
      await setItem(a, "private", "later", { live: true }, token);
      await page.locator(rowSel("later")).waitFor();
      await page.screenshot({ animations: "disabled", path: screenshotPath("token") });
      assert.deepEqual(problems, []);
    } catch (e) {
      await failed("token", e);
    } finally {
      await context.close();
    }
  });
});
