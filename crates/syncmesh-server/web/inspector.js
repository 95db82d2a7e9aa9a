// The syncmesh inspector: a node's identity and peers, its maps, a map's items (paged,
// searchable by key prefix) and its live events, with forms to add, edit and remove; and whom
// the node shares maps with (trusted, connected, discovered peers, problems), with forms to
// invite a node, join one with its ticket, trust a peer id, and stop trusting a peer.
// Everything goes through the JavaScript client the node serves. Keys, data and peer ids come
// from peers: they only ever reach the page through textContent and attribute values.
import { SyncClient } from "/sdk/syncmesh.js";

const $ = (id) => document.getElementById(id);

const EVENT_LOG_CAP = 500;
const NODE_POLL_MS = 2000;
const MAX_TTL = 31_536_000;
const MAX_DATA_BYTES = 16 * 1024;

// The page's key (see the node's ui.rs): handed over once, right after signing in, in the
// address's fragment (never sent to a server), then kept in this origin's storage (other ports
// of the host cannot read it) and taken out of the address. The meta tag carries it only when
// the page was asked for with the token itself. The page is served without substitution only by
// development servers: the slot's own text then means "no key".
const KEY_STORE = "syncmesh-page-key";
const fromFragment = new URLSearchParams(location.hash.slice(1)).get("k");
if (fromFragment) {
  try { localStorage.setItem(KEY_STORE, fromFragment); } catch { /* storage off: this load only */ }
  history.replaceState(null, "", location.pathname + location.search);
}
const tokenSlot = document.querySelector('meta[name="syncmesh-token"]')?.content ?? "";
const fromSlot = tokenSlot && tokenSlot !== "__SYNCMESH" + "_TOKEN__" ? tokenSlot : undefined;
let stored;
try { stored = localStorage.getItem(KEY_STORE) ?? undefined; } catch { stored = undefined; }
const token = fromSlot ?? fromFragment ?? stored;

const client = new SyncClient({ url: location.origin, token });

const state = {
  clientState: client.connectionState ?? "connecting",
  nodeKey: "",
  peersKey: "",
  peerId: null, // this node's own peer id
  nodeRefresh: 0,
  nodeMapCount: null,
  maps: [],
  mapsPager: null,
  mapsSeq: 0,
  current: null, // the open SyncMap
  openingId: null,
  openSeq: 0,
  createdHandle: null, // a map this page just created, handed to the router
  page: null, // Paginator of the items shown
  peeked: null, // { from, page }: the page after `from`, fetched ahead during a search
  pageIndex: 0,
  pageFirst: null,
  pageLast: null,
  pageHasNext: false,
  pageSize: 25,
  prefix: "",
  loadSeq: 0,
  loading: false,
  pending: [], // events that arrived while a page was loading, applied after it
  rows: new Map(), // key -> { tr, item }
  events: 0,
  editing: null, // { mode: "add" | "edit", key, item, attempted }
};

// ---------------------------------------------------------------- small helpers

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

/** Orders keys as the node does: by Unicode code point (UTF-8 byte order), not UTF-16 units. */
function cmpKeys(a, b) {
  if (a === b) return 0;
  const ia = a[Symbol.iterator]();
  const ib = b[Symbol.iterator]();
  for (;;) {
    const x = ia.next();
    const y = ib.next();
    if (x.done) return y.done ? 0 : -1;
    if (y.done) return 1;
    const cx = x.value.codePointAt(0);
    const cy = y.value.codePointAt(0);
    if (cx !== cy) return cx < cy ? -1 : 1;
  }
}

function shortId(id) {
  if (!id) return "";
  return id.length > 16 ? `${id.slice(0, 8)}…${id.slice(-6)}` : id;
}

function debounce(fn, ms) {
  let t;
  return (...args) => {
    clearTimeout(t);
    t = setTimeout(() => fn(...args), ms);
  };
}

const timeFmt = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });
const dateFmt = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });

function asDate(d) {
  if (!d) return null;
  const date = d instanceof Date ? d : new Date(d);
  return Number.isNaN(date.getTime()) ? null : date;
}

function relative(date) {
  const s = Math.round((Date.now() - date.getTime()) / 1000);
  if (s < 5) return "just now";
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return dateFmt.format(date);
}

function untilText(date) {
  const s = Math.round((date.getTime() - Date.now()) / 1000);
  if (s <= 0) return "expiring";
  if (s < 120) return `expires in ${s} s`;
  if (s < 7200) return `expires in ${Math.round(s / 60)} min`;
  if (s < 172800) return `expires in ${Math.round(s / 3600)} h`;
  return `expires ${dateFmt.format(date)}`;
}

function timeElement(d, cls) {
  const date = asDate(d);
  const t = el("time", { class: cls });
  if (date) {
    t.dateTime = date.toISOString();
    t.title = date.toISOString();
    t.textContent = relative(date);
  }
  return t;
}

function refreshTimes() {
  for (const t of document.querySelectorAll("#items time[datetime]")) {
    t.textContent = relative(new Date(t.dateTime));
  }
}

/** A one-line, coloured rendering of a JSON value, cut after about `budget` characters. */
function jsonPreview(value, budget = 220) {
  const frag = document.createDocumentFragment();
  let left = budget;
  const put = (text, cls) => {
    if (left <= 0) return;
    if (text.length > left) text = `${text.slice(0, left)}…`;
    left -= text.length;
    frag.append(el("span", { class: cls, text }));
  };
  const walk = (v) => {
    if (left <= 0) return;
    if (v === null || typeof v === "boolean") put(String(v), "j-lit");
    else if (typeof v === "number") put(String(v), "j-num");
    else if (typeof v === "string") put(JSON.stringify(v), "j-str");
    else if (Array.isArray(v)) {
      put("[", "j-punct");
      for (let i = 0; i < v.length && left > 0; i++) {
        if (i) put(", ", "j-punct");
        walk(v[i]);
      }
      put("]", "j-punct");
    } else if (typeof v === "object") {
      put("{", "j-punct");
      let i = 0;
      for (const k of Object.keys(v)) {
        if (left <= 0) break;
        if (i++) put(", ", "j-punct");
        put(JSON.stringify(k), "j-key");
        put(": ", "j-punct");
        walk(v[k]);
      }
      put("}", "j-punct");
    } else put(String(v), "j-punct");
  };
  walk(value);
  return frag;
}

function jsonTitle(value) {
  const s = JSON.stringify(value);
  return s && s.length > 600 ? `${s.slice(0, 600)}…` : s ?? "";
}

function errorText(e) {
  if (!e) return "Unknown error";
  const code = e.code ? ` (${e.code})` : "";
  return `${e.message || String(e)}${code}`;
}

// ---------------------------------------------------------------- status messages

function toast(message, { error = false, ms = 4000 } = {}) {
  const area = error ? $("alert") : $("status");
  const t = el("div", { class: error ? "toast error" : "toast", text: message });
  area.append(t);
  while (area.children.length > 3) area.firstChild.remove();
  setTimeout(() => t.remove(), error ? Math.max(ms, 6000) : ms);
}

// ---------------------------------------------------------------- connection and node

const CONNECTION_TEXT = {
  connected: "connected",
  connecting: "connecting…",
  disconnected: "disconnected",
  denied: "token refused",
  error: "error",
};

function renderConnection() {
  const s = state.clientState;
  const pill = $("connection");
  if (pill.dataset.state === s) return;
  pill.dataset.state = s;
  $("connection-text").textContent = CONNECTION_TEXT[s] ?? s;
}

client.on("connectionStateChanged", (s) => {
  const was = state.clientState;
  state.clientState = s;
  renderConnection();
  if (s === "denied" && was !== "denied") {
    toast("The node refused this page's token. Reload the page to sign in again.", { error: true, ms: 15000 });
  }
});

function fillList(list, values, emptyText, itemClass) {
  list.replaceChildren();
  if (!values.length) {
    list.append(el("li", { class: "none", text: emptyText }));
    return;
  }
  for (const v of values) list.append(el("li", { class: itemClass, text: v, title: v }));
}

async function copyText(text, what) {
  try {
    await navigator.clipboard.writeText(text);
    toast(`Copied ${what}.`);
  } catch {
    toast(`Could not copy: the browser refused the clipboard.`, { error: true });
  }
}

/** Listen addresses, shown without the `/p2p/<peer id>` every one of them ends with. */
function renderListenAddrs(addrs, peerId) {
  const list = $("listen-addrs");
  list.replaceChildren();
  if (!addrs.length) {
    list.append(el("li", { class: "none", text: "not listening" }));
    return;
  }
  const suffix = peerId ? `/p2p/${peerId}` : null;
  for (const addr of addrs) {
    const shown = suffix && addr.endsWith(suffix) ? addr.slice(0, -suffix.length) : addr;
    list.append(
      el(
        "li",
        { class: "addr", "data-addr": addr, title: addr },
        el("span", { text: shown }),
        el("button", {
          type: "button",
          class: "copy",
          text: "copy",
          "aria-label": `Copy the address ${addr}`,
          onclick: () => copyText(addr, "the address"),
        }),
      ),
    );
  }
}

function renderNode(n) {
  const key = JSON.stringify([n.node_id, n.peer_id, n.version, n.listen_addrs, n.connected_peers]);
  if (key === state.nodeKey) return;
  state.nodeKey = key;
  state.peerId = n.peer_id ?? null;
  $("node-id").textContent = n.node_id ?? "—";
  $("peer-id").textContent = n.peer_id ?? "no network";
  $("node-version").textContent = n.version ? `v${n.version}` : "";
  $("node-headline").textContent = n.node_id ? `node ${shortId(n.node_id)}` : "";
  renderListenAddrs(n.listen_addrs ?? [], n.peer_id);
  const peers = n.connected_peers ?? [];
  fillList($("peers"), peers, "no peers connected", "peer");
  $("peer-count").textContent = String(peers.length);
}

async function pollNode() {
  await refreshNode();
  setTimeout(pollNode, NODE_POLL_MS);
}

/** Reads the node's description now and shows it (also right after a change of trust). */
async function refreshNode() {
  const seq = ++state.nodeRefresh;
  try {
    const n = await client.node();
    if (seq !== state.nodeRefresh) return; // a newer answer is on its way
    renderNode(n);
    renderPeers(n);
    if (typeof n.maps === "number" && state.nodeMapCount !== null && n.maps !== state.nodeMapCount) loadMaps();
    state.nodeMapCount = n.maps;
  } catch {
    // The client waits while the node is unreachable and reports it as its connection state;
    // a refused token is reported the same way.
  }
}

// ---------------------------------------------------------------- sharing: whom maps go to

/**
 * A call to the node's own routes (invitations, joins, trusted peers), which the Sync Maps
 * client has no methods for: through the client, so the token, waiting while the node is
 * unreachable and error reporting are the same as everywhere on the page.
 */
async function nodeCall(method, path, body) {
  return client.admitted(() => client.send(method, path, body === undefined ? {} : { body }));
}

const SOURCE_TEXT = {
  invited: "joined with this node's ticket",
  joined: "this node joined it",
  manual: "trusted by id",
  config: "trusted by --trust",
};

function scopeText(maps, write) {
  const what = maps ? `${maps.length} map${maps.length === 1 ? "" : "s"}` : "every map";
  return `${what}, ${write ? "read and write" : "read only"}`;
}

function peerItem(id, attrs, ...meta) {
  return el(
    "li",
    { "data-peer-id": id, ...attrs },
    el("span", { class: "peer-id", text: id, title: attrs.title ?? id }),
    meta.length ? el("span", { class: "peer-meta" }, ...meta) : null,
  );
}

function renderPeers(n) {
  const key = JSON.stringify([
    n.trust_all,
    n.trusted_peers,
    n.untrusted_peers,
    (n.discovered_peers ?? []).map((d) => [d.peer_id, d.addrs, d.trusted]),
    n.problems,
    n.refused_changes,
  ]);
  if (key === state.peersKey) return;
  state.peersKey = key;
  const trusted = n.trusted_peers ?? [];
  const untrusted = n.untrusted_peers ?? [];
  const discovered = n.discovered_peers ?? [];
  const problems = n.problems ?? [];
  $("trust-all-warning").hidden = !n.trust_all;
  $("trusted-count").textContent = String(trusted.length);

  const list = $("trusted-peers");
  const focused = document.activeElement?.closest?.("#trusted-peers li")?.dataset.peerId;
  list.replaceChildren();
  if (!trusted.length) {
    list.append(el("li", { class: "none", text: "No trusted peers yet: invite a node, or join one with its ticket." }));
  }
  for (const p of trusted) {
    const conn = el("span", { class: p.connected ? "peer-state on" : "peer-state off", text: p.connected ? "connected" : "not connected" });
    const scope = el("span", { text: ` · ${scopeText(p.maps, p.write)}`, title: p.maps ? p.maps.join("\n") : "every map" });
    const source = el("span", { text: ` · ${SOURCE_TEXT[p.source] ?? p.source}` });
    const refused = p.refused_changes ? el("span", { class: "peer-refused", text: ` · ${p.refused_changes} change(s) refused` }) : null;
    const li = peerItem(
      p.peer_id,
      { class: "trusted", "data-connected": String(p.connected), "data-source": p.source, title: p.addrs?.length ? `${p.peer_id}\n${p.addrs.join("\n")}` : p.peer_id },
      conn,
      scope,
      source,
      refused,
    );
    li.append(
      el("button", {
        type: "button",
        class: "btn small danger-ghost untrust",
        "data-action": "untrust",
        text: "Untrust",
        "aria-label": `Stop trusting ${p.peer_id}`,
      }),
    );
    list.append(li);
  }
  if (focused) list.querySelector(`li[data-peer-id="${CSS.escape(focused)}"] button`)?.focus();

  $("untrusted-group").hidden = !untrusted.length;
  $("untrusted-count").textContent = String(untrusted.length);
  $("untrusted-peers").replaceChildren(...untrusted.map((id) => peerItem(id, {}, "nothing is exchanged with it")));

  $("discovered-group").hidden = !discovered.length;
  $("discovered-count").textContent = String(discovered.length);
  $("discovered-peers").replaceChildren(
    ...discovered.map((d) => {
      const seen = asDate(d.last_seen);
      return peerItem(
        d.peer_id,
        { "data-trusted": String(d.trusted), title: [d.peer_id, ...(d.addrs ?? [])].join("\n") },
        d.trusted ? "trusted" : "not trusted: listed only",
        seen ? ` · seen ${relative(seen)}` : "",
      );
    }),
  );

  $("problems-group").hidden = !problems.length;
  $("problem-count").textContent = String(problems.length);
  // The latest problem of each peer stays listed after it is solved; a peer trusted and
  // connected now had it earlier.
  const fine = new Set(trusted.filter((p) => p.connected).map((p) => p.peer_id));
  $("peer-problems").replaceChildren(
    ...problems.map((pr) => {
      const who = pr.peer_id ?? pr.addr ?? "unknown peer";
      const at = asDate(pr.at);
      const earlier = fine.has(pr.peer_id);
      return el(
        "li",
        { class: "problem", "data-peer-id": pr.peer_id ?? "", "data-current": String(!earlier), title: at ? at.toISOString() : "" },
        el("span", { class: "peer-id", text: who }),
        el("span", {
          class: "peer-meta",
          text: `${earlier ? "earlier: " : ""}${pr.reason}${at ? ` (${relative(at)})` : ""}`,
        }),
      );
    }),
  );

  const refusedTotal = n.refused_changes ?? 0;
  $("refused-changes").hidden = !refusedTotal;
  $("refused-changes").textContent = `${refusedTotal} change(s) refused from peers that may not write a map.`;
}

const dialogReturn = new WeakMap();

function openDialog(id, focus) {
  const d = $(id);
  if (d.open) return;
  dialogReturn.set(d, document.activeElement);
  d.showModal();
  focus?.focus();
}

function wireDialog(id) {
  const d = $(id);
  for (const b of d.querySelectorAll("[data-cancel]")) b.addEventListener("click", () => d.close());
  d.addEventListener("close", () => {
    const back = dialogReturn.get(d);
    dialogReturn.delete(d);
    if (focusPlaced(d)) return;
    if (back && back.isConnected && back !== document.body) back.focus();
  });
}

function openInvite() {
  $("invite-form").reset();
  $("invite-ticket").value = "";
  $("invite-result").hidden = true;
  $("invite-create").textContent = "Create invitation";
  showFieldError($("invite-error"), null, [$("invite-maps"), $("invite-ttl"), $("invite-uses")]);
  openDialog("invite-dialog", $("invite-maps"));
}

function wholeNumber(text, min, max) {
  const t = text.trim();
  if (!/^\d+$/.test(t)) return null;
  const n = Number(t);
  return n >= min && n <= max ? n : null;
}

async function createInvite(ev) {
  ev.preventDefault();
  const mapsInput = $("invite-maps");
  const ttlInput = $("invite-ttl");
  const usesInput = $("invite-uses");
  showFieldError($("invite-error"), null, [mapsInput, ttlInput, usesInput]);
  const maps = mapsInput.value
    .split("\n")
    .map((m) => m.trim())
    .filter(Boolean);
  const minutes = wholeNumber(ttlInput.value, 1, 525_600);
  if (minutes === null) {
    showFieldError($("invite-error"), "Valid for: whole minutes from 1 to 525,600 (a year).", [ttlInput]);
    ttlInput.focus();
    return;
  }
  const uses = wholeNumber(usesInput.value, 1, 1_000_000);
  if (uses === null) {
    showFieldError($("invite-error"), "Uses: a whole number, at least 1.", [usesInput]);
    usesInput.focus();
    return;
  }
  const body = { Write: !$("invite-read-only").checked, Ttl: minutes * 60, Uses: uses };
  if (maps.length) body.Maps = maps;
  const button = $("invite-create");
  button.disabled = true;
  button.textContent = "Creating…";
  try {
    const inv = (await nodeCall("POST", "/v1/Node/Invites", body)).body;
    const expires = asDate(inv.expires);
    $("invite-ticket").value = inv.ticket;
    $("invite-summary").textContent =
      `${scopeText(inv.maps, inv.write)}; ${inv.uses} node${inv.uses === 1 ? "" : "s"} may join with it` +
      (expires ? `, until ${dateFmt.format(expires)}.` : ".");
    $("invite-result").hidden = false;
    button.textContent = "Create another";
    $("invite-ticket").focus();
    $("invite-ticket").select();
  } catch (e) {
    button.textContent = "Create invitation";
    showFieldError($("invite-error"), `The node did not create the invitation: ${errorText(e)}`, []);
  } finally {
    button.disabled = false;
  }
}

function openJoin() {
  $("join-form").reset();
  showFieldError($("join-error"), null, [$("join-ticket")]);
  openDialog("join-dialog", $("join-ticket"));
}

async function joinWithTicket(ev) {
  ev.preventDefault();
  const input = $("join-ticket");
  const box = $("join-error");
  const ticket = input.value.trim();
  showFieldError(box, null, [input]);
  if (!ticket) {
    showFieldError(box, "Paste the ticket from the other node's invitation.", [input]);
    input.focus();
    return;
  }
  if (!/^smt1[a-z2-7]+$/i.test(ticket)) {
    showFieldError(box, "This is not a ticket: a ticket starts with smt1; copy it whole from the other node.", [input]);
    input.focus();
    return;
  }
  const button = $("join-submit");
  button.disabled = true;
  button.textContent = "Joining…";
  try {
    const peer = (await nodeCall("POST", "/v1/Node/Join", { Ticket: ticket })).body;
    $("join-dialog").close();
    toast(`Joined ${shortId(peer.peer_id)}: the two nodes now trust each other.`);
    refreshNode();
  } catch (e) {
    const why =
      e?.code === 20302
        ? `The other node refused: ${e.message}`
        : e?.code === 20303
          ? `The other node could not be reached: ${e.message}`
          : `Could not join: ${errorText(e)}`;
    showFieldError(box, why, [input]);
    input.focus();
  } finally {
    button.disabled = false;
    button.textContent = "Join";
  }
}

function openTrust() {
  $("trust-form").reset();
  showFieldError($("trust-error"), null, [$("trust-peer-id"), $("trust-addr")]);
  openDialog("trust-dialog", $("trust-peer-id"));
}

async function trustPeerId(ev) {
  ev.preventDefault();
  const idInput = $("trust-peer-id");
  const addrInput = $("trust-addr");
  const box = $("trust-error");
  const id = idInput.value.trim();
  const addr = addrInput.value.trim();
  showFieldError(box, null, [idInput, addrInput]);
  let problem = null;
  if (!id) problem = "Enter the peer id of the node to trust.";
  else if (!/^[1-9A-HJ-NP-Za-km-z]{32,128}$/.test(id)) problem = "This is not a peer id: copy it whole (it looks like 12D3KooW…).";
  else if (id === state.peerId) problem = "This is this node's own peer id: enter the other node's.";
  if (problem) {
    showFieldError(box, problem, [idInput]);
    idInput.focus();
    return;
  }
  if (addr && !addr.startsWith("/")) {
    showFieldError(box, "An address is a multiaddr, such as /ip4/192.0.2.7/tcp/7701.", [addrInput]);
    addrInput.focus();
    return;
  }
  const button = $("trust-submit");
  button.disabled = true;
  try {
    const r = await nodeCall("POST", `/v1/Node/Peers/${encodeURIComponent(id)}`, addr ? { Addr: [addr] } : {});
    $("trust-dialog").close();
    toast(r.status === 201 ? `Now trusting ${shortId(id)}.` : `${shortId(id)} was already trusted.`);
    refreshNode();
  } catch (e) {
    showFieldError(box, `The node did not trust it: ${errorText(e)}`, [idInput]);
    idInput.focus();
  } finally {
    button.disabled = false;
  }
}

async function untrustPeer(id) {
  const ok = await confirmDialog(
    "Stop trusting this peer?",
    `${id} is disconnected at once: it gets no more changes from this node, and its changes are no longer accepted. To share with it again, invite it or trust its id.`,
    "Untrust",
  );
  if (!ok) return;
  try {
    await nodeCall("DELETE", `/v1/Node/Peers/${encodeURIComponent(id)}`);
    toast(`No longer trusting ${shortId(id)}.`);
  } catch (e) {
    if (e?.code === 20305) toast(`${shortId(id)} was not trusted any more.`);
    else toast(`Could not untrust ${shortId(id)}: ${errorText(e)}`, { error: true });
  }
  refreshNode();
}

// ---------------------------------------------------------------- maps

function mapLabel(m) {
  return m.uniqueName ?? m.unique_name ?? null;
}

function sortMaps(list) {
  return [...list].sort((a, b) => {
    const na = mapLabel(a);
    const nb = mapLabel(b);
    if (na && nb) return na.localeCompare(nb);
    if (na) return -1;
    if (nb) return 1;
    return a.sid < b.sid ? -1 : 1;
  });
}

async function loadMaps({ more = false } = {}) {
  const seq = ++state.mapsSeq;
  try {
    let pager;
    let all;
    if (more && state.mapsPager?.hasNextPage) {
      pager = await state.mapsPager.nextPage();
      all = [...state.maps, ...pager.items];
    } else {
      // Reload as many maps as were shown, so a refresh keeps the list's length.
      const want = Math.max(state.maps.length, 1);
      pager = await client.maps({ pageSize: 100 });
      all = [...pager.items];
      while (all.length < want && pager.hasNextPage) {
        pager = await pager.nextPage();
        all.push(...pager.items);
      }
    }
    if (seq !== state.mapsSeq) return;
    state.mapsPager = pager;
    state.maps = all;
    renderMaps();
  } catch (e) {
    if (seq === state.mapsSeq) toast(`Could not list the maps: ${errorText(e)}`, { error: true });
  }
}

function mapHref(sid) {
  return `#/maps/${encodeURIComponent(sid)}`;
}

function renderMaps() {
  const list = $("maps");
  const focusedSid = document.activeElement?.closest?.("#maps a")?.dataset.sid;
  list.replaceChildren();
  for (const m of sortMaps(state.maps)) {
    const name = mapLabel(m);
    const a = el(
      "a",
      { href: mapHref(m.sid), "data-sid": m.sid, title: name ? `${name} (${m.sid})` : m.sid },
      el("span", { class: name ? "map-name" : "map-name unnamed", text: name ?? "untitled map" }),
      el("span", { class: "map-sub", text: m.sid }),
    );
    if (state.current && state.current.sid === m.sid) a.setAttribute("aria-current", "page");
    list.append(el("li", {}, a));
  }
  $("map-count").textContent = String(state.maps.length) + (state.mapsPager?.hasNextPage ? "+" : "");
  $("maps-empty").hidden = state.maps.length > 0;
  $("maps-more").hidden = !state.mapsPager?.hasNextPage;
  if (focusedSid) list.querySelector(`a[data-sid="${CSS.escape(focusedSid)}"]`)?.focus();
}

function markCurrentMap() {
  for (const a of document.querySelectorAll("#maps a")) {
    if (state.current && a.dataset.sid === state.current.sid) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
}

function toggleNewMapForm(open) {
  const form = $("new-map-form");
  const button = $("new-map-button");
  form.hidden = !open;
  button.setAttribute("aria-expanded", String(open));
  if (open) {
    form.reset();
    showFieldError($("new-map-error"), null, [$("new-map-name"), $("new-map-ttl")]);
    $("new-map-name").focus();
  } else if (form.contains(document.activeElement) || document.activeElement === document.body) {
    button.focus();
  }
}

function parseTtl(text) {
  const t = text.trim();
  if (t === "") return { ttl: undefined };
  if (!/^\d+$/.test(t) || Number(t) > MAX_TTL) {
    return { error: `The TTL is whole seconds from 0 to ${MAX_TTL.toLocaleString("en")}.` };
  }
  return { ttl: Number(t) };
}

function showFieldError(box, message, fields = []) {
  box.textContent = message ?? "";
  box.hidden = !message;
  for (const f of fields) {
    if (message) f.setAttribute("aria-invalid", "true");
    else f.removeAttribute("aria-invalid");
  }
}

async function createMap(ev) {
  ev.preventDefault();
  const nameInput = $("new-map-name");
  const ttlInput = $("new-map-ttl");
  const box = $("new-map-error");
  const name = nameInput.value.trim();
  showFieldError(box, null, [nameInput, ttlInput]);
  if (name === "." || name === "..") {
    showFieldError(box, "The names . and .. cannot be addressed in a URL; pick another.", [nameInput]);
    nameInput.focus();
    return;
  }
  if ([...name].length > 320) {
    showFieldError(box, "A unique name has at most 320 characters.", [nameInput]);
    nameInput.focus();
    return;
  }
  const { ttl, error } = parseTtl(ttlInput.value);
  if (error) {
    showFieldError(box, error, [ttlInput]);
    ttlInput.focus();
    return;
  }
  const submit = ev.target.querySelector('[type="submit"]');
  submit.disabled = true;
  try {
    const opts = { mode: "create_new" };
    if (name) opts.id = name;
    if (ttl) opts.ttl = ttl;
    const map = await client.map(opts);
    toast(`Created map ${name || map.sid}.`);
    toggleNewMapForm(false);
    state.createdHandle = map;
    state.maps = [...state.maps.filter((m) => m.sid !== map.sid), { sid: map.sid, uniqueName: map.uniqueName }];
    renderMaps();
    location.hash = mapHref(map.sid);
    loadMaps();
  } catch (e) {
    const message = e?.code === 54301 ? `A map named “${name}” already exists.` : `Could not create the map: ${errorText(e)}`;
    showFieldError(box, message, [nameInput]);
    nameInput.focus();
  } finally {
    submit.disabled = false;
  }
}

// ---------------------------------------------------------------- routing

function parseRoute() {
  const m = location.hash.match(/^#\/maps\/([^/?]+)\/?$/);
  if (!m) return null;
  try {
    return decodeURIComponent(m[1]);
  } catch {
    return null;
  }
}

function route() {
  const id = parseRoute();
  if (id) openMap(id);
  else closeMap();
}

function showWelcome(title, text) {
  $("welcome-title").textContent = title;
  $("welcome-text").textContent = text;
  $("no-map").hidden = false;
  $("map-view").hidden = true;
}

function closeMap() {
  state.openSeq++;
  state.openingId = null;
  detachCurrent();
  showWelcome("Pick a map", "Choose a map on the left, or create one, to see its items and follow its events live.");
  document.title = "syncmesh inspector";
  markCurrentMap();
  renderConnection();
}

function detachCurrent() {
  const map = state.current;
  state.current = null;
  state.rows.clear();
  state.pending = [];
  state.page = null;
  if (map) {
    try {
      map.close();
    } catch {
      // closing a handle never matters to the page
    }
  }
}

async function openMap(id) {
  if (state.current && (state.current.sid === id || state.current.uniqueName === id)) return;
  if (state.openingId === id) return;
  const seq = ++state.openSeq;
  state.openingId = id;
  detachCurrent();
  clearEventLog();
  $("search").value = "";
  state.prefix = "";
  let map;
  const created = state.createdHandle;
  state.createdHandle = null;
  try {
    map = created && created.sid === id ? created : await client.map({ id, mode: "open_existing" });
  } catch (e) {
    if (seq !== state.openSeq) return;
    state.openingId = null;
    if (e?.code === 54200) showWelcome("Map not found", `This node has no map “${id}”. It may have been removed.`);
    else showWelcome("Could not open the map", errorText(e));
    return;
  }
  if (seq !== state.openSeq) {
    if (map !== created) map.close();
    return;
  }
  state.openingId = null;
  state.current = map;
  map.on("itemAdded", (a) => onItemEvent(map, "itemAdded", a));
  map.on("itemUpdated", (a) => onItemEvent(map, "itemUpdated", a));
  map.on("itemRemoved", (a) => onItemEvent(map, "itemRemoved", a));
  map.on("removed", (a) => onMapRemoved(map, a));
  renderMapHead(map);
  $("no-map").hidden = true;
  $("map-view").hidden = false;
  markCurrentMap();
  renderConnection();
  await loadItems("first");
}

function renderMapHead(map) {
  const title = $("map-title");
  title.textContent = map.uniqueName ?? "untitled map";
  title.classList.toggle("unnamed", !map.uniqueName);
  $("map-sid").textContent = map.sid;
  const exp = asDate(map.dateExpires);
  $("map-expires").textContent = exp ? untilText(exp) : "";
  document.title = `${map.uniqueName ?? map.sid} · syncmesh inspector`;
}

function onMapRemoved(map, args) {
  if (map !== state.current) return;
  logEvent("removed", { isLocal: args?.isLocal, key: map.uniqueName ?? map.sid });
  toast(args?.isLocal ? "The map was removed." : "This map was removed elsewhere.", { error: !args?.isLocal });
  state.maps = state.maps.filter((m) => m.sid !== map.sid);
  closeItemDialog();
  // Replaced, not pushed: going back should not lead to a map that is gone.
  history.replaceState(null, "", "#/");
  closeMap();
  showWelcome("Map removed", `The map ${map.uniqueName ?? map.sid} and its items are gone.`);
  renderMaps();
  loadMaps();
}

// ---------------------------------------------------------------- items

async function loadItems(how) {
  const map = state.current;
  if (!map) return;
  const seq = ++state.loadSeq;
  state.loading = true;
  state.pending = [];
  $("items-summary").textContent = "Loading…";
  let page;
  let index = state.pageIndex;
  try {
    if (how === "next" && state.page) {
      page = state.peeked && state.peeked.from === state.page ? state.peeked.page : await state.page.nextPage();
      index += 1;
    } else if (how === "prev" && state.page) {
      page = await state.page.prevPage();
      index = Math.max(0, index - 1);
    } else {
      const query = { pageSize: state.pageSize, order: "asc" };
      if (state.prefix) query.from = state.prefix;
      page = await map.getItems(query);
      index = 0;
    }
  } catch (e) {
    if (seq !== state.loadSeq || map !== state.current) return;
    state.loading = false;
    $("items-summary").textContent = "";
    if (e?.code === 54200) {
      onMapRemoved(map, { isLocal: false });
      return;
    }
    toast(`Could not load the items: ${errorText(e)}`, { error: true });
    renderPager();
    return;
  }
  if (seq !== state.loadSeq || map !== state.current) return;
  const prefix = state.prefix;
  let items = page.items;
  let hasNext = page.hasNextPage;
  if (prefix) {
    // The listing starts at the prefix; the first key without it ends the matches.
    const stop = items.findIndex((it) => !it.key.startsWith(prefix));
    if (stop >= 0) {
      items = items.slice(0, stop);
      hasNext = false;
    }
  }
  state.page = page;
  state.pageIndex = index;
  state.pageHasNext = hasNext;
  state.pageFirst = page.items.length ? page.items[0].key : null;
  state.pageLast = page.items.length ? page.items[page.items.length - 1].key : null;
  state.peeked = null;
  renderRows(items);
  state.loading = false;
  const pending = state.pending;
  state.pending = [];
  for (const [type, args] of pending) applyEvent(type, args, false);
  renderPager();
  if (prefix && hasNext) peekNext(page, seq, prefix);
}

/**
 * With a search, a full page may be the last one of the matches: look at the next page now
 * (kept for the Next button) so Next is offered only when more matching keys follow.
 */
async function peekNext(page, seq, prefix) {
  let next;
  try {
    next = await page.nextPage();
  } catch {
    return; // Next will try again and report
  }
  if (seq !== state.loadSeq || state.page !== page) return;
  state.peeked = { from: page, page: next };
  if (!next.items.length || !next.items[0].key.startsWith(prefix)) {
    state.pageHasNext = false;
    renderPager();
  }
}

function pageHasPrev() {
  if (!state.page) return false;
  return state.pageIndex > 0 && state.page.hasPrevPage !== false;
}

function renderPager() {
  $("prev-page").disabled = !pageHasPrev();
  $("next-page").disabled = !(state.page && state.pageHasNext);
  const n = state.rows.size;
  const prefix = state.prefix;
  const empty = $("items-empty");
  if (n === 0) {
    empty.hidden = false;
    empty.textContent = prefix
      ? `No keys start with “${prefix}”.`
      : state.pageIndex > 0
        ? "No more items."
        : "This map has no items yet. Press n to add one.";
  } else empty.hidden = true;
  const what = `${n} item${n === 1 ? "" : "s"}`;
  const filter = prefix ? ` starting with “${prefix}”` : "";
  const more = state.pageHasNext ? " · more on the next pages" : "";
  $("items-summary").textContent = `${what}${filter} · page ${state.pageIndex + 1}${more}`;
}

function rowFor(item) {
  const key = item.key;
  const keyButton = el("button", {
    type: "button",
    class: "key-button",
    text: key,
    title: `Edit ${key}`,
    "aria-label": `Edit item ${key}`,
    "data-action": "edit",
  });
  const preview = el("span", { class: "data-preview", title: jsonTitle(item.data) });
  preview.append(jsonPreview(item.data));
  const tr = el(
    "tr",
    { "data-key": key },
    el("td", { class: "col-key" }, keyButton),
    el("td", { class: "col-data" }, preview),
    el("td", { class: "col-updated" }, timeElement(item.dateUpdated, "updated")),
    el(
      "td",
      { class: "col-actions" },
      el(
        "div",
        { class: "row-actions" },
        el("button", { type: "button", class: "btn ghost", "data-action": "edit", "aria-label": `Edit item ${key}`, text: "Edit" }),
        el("button", { type: "button", class: "btn ghost remove", "data-action": "remove", "aria-label": `Remove item ${key}`, text: "Remove" }),
      ),
    ),
  );
  return tr;
}

function renderRows(items) {
  const tbody = $("items");
  const focusedKey = document.activeElement?.closest?.("#items tr")?.dataset.key;
  state.rows.clear();
  tbody.replaceChildren();
  for (const item of items) {
    const tr = rowFor(item);
    state.rows.set(item.key, { tr, item });
    tbody.append(tr);
  }
  if (focusedKey !== undefined) state.rows.get(focusedKey)?.tr.querySelector(".key-button")?.focus();
}

function belongsOnPage(key) {
  if (state.prefix && !key.startsWith(state.prefix)) return false;
  if (state.pageIndex > 0 && state.pageFirst !== null && cmpKeys(key, state.pageFirst) < 0) return false;
  if (state.pageHasNext && state.pageLast !== null && cmpKeys(key, state.pageLast) > 0) return false;
  return true;
}

function flash(tr) {
  tr.classList.remove("flash");
  void tr.offsetWidth; // restart the animation
  tr.classList.add("flash");
}

function upsertRow(item, highlight = true) {
  const existing = state.rows.get(item.key);
  const tr = rowFor(item);
  if (existing) {
    const hadFocus = existing.tr.contains(document.activeElement);
    const focusedAction = document.activeElement?.dataset?.action;
    existing.tr.replaceWith(tr);
    if (hadFocus) tr.querySelector(`[data-action="${focusedAction}"]`)?.focus();
  } else {
    if (!belongsOnPage(item.key)) return;
    let before = null;
    for (const [k, r] of state.rows) {
      if (cmpKeys(k, item.key) > 0 && (before === null || cmpKeys(k, before.key) < 0)) before = { key: k, tr: r.tr };
    }
    $("items").insertBefore(tr, before ? before.tr : null);
  }
  state.rows.set(item.key, { tr, item });
  if (highlight) flash(tr);
}

function removeRow(key) {
  const r = state.rows.get(key);
  if (!r) return;
  const hadFocus = r.tr.contains(document.activeElement);
  const next = hadFocus ? (r.tr.nextElementSibling ?? r.tr.previousElementSibling) : null;
  r.tr.remove();
  state.rows.delete(key);
  if (next) next.querySelector(".key-button")?.focus();
  else if (hadFocus) $("search").focus();
}

function onItemEvent(map, type, args) {
  if (map !== state.current) return;
  logEvent(type, args);
  if (state.loading) {
    state.pending.push([type, args]);
    return;
  }
  applyEvent(type, args, true);
  renderPager();
}

function applyEvent(type, args, highlight) {
  const key = type === "itemRemoved" ? args.key : (args.item?.key ?? args.key);
  if (type === "itemRemoved") removeRow(key);
  else if (args.item) upsertRow(args.item, highlight);
  const ed = state.editing;
  if (ed && ed.mode === "edit" && ed.key === key && !args.isLocal && $("item-dialog").open) {
    $("item-meta").textContent =
      type === "itemRemoved"
        ? "This item was removed elsewhere while you edit it; saving creates it again."
        : "This item changed elsewhere while you edit it; saving replaces that change.";
  }
}

// ---------------------------------------------------------------- event log

/** The top-level fields an update changed, as `field: old → new`; null when nothing is known. */
function changeSummary(before, after) {
  if (!before || typeof before !== "object" || !after || typeof after !== "object") return null;
  const frag = document.createDocumentFragment();
  const keys = [...Object.keys(after), ...Object.keys(before).filter((k) => !(k in after))];
  let shown = 0;
  for (const k of keys) {
    if (JSON.stringify(before[k]) === JSON.stringify(after[k])) continue;
    if (shown++) frag.append(el("span", { class: "j-punct", text: ", " }));
    if (shown > 4) {
      frag.append(el("span", { class: "j-punct", text: "…" }));
      break;
    }
    if (!(k in before)) {
      frag.append(el("span", { class: "j-add", text: `+${k}: ` }), jsonPreview(after[k], 40));
    } else if (!(k in after)) {
      frag.append(el("span", { class: "j-del", text: k }));
    } else {
      frag.append(
        el("span", { class: "j-key", text: `${k}: ` }),
        el("span", { class: "j-old" }, jsonPreview(before[k], 30)),
        el("span", { class: "j-punct", text: " → " }),
        jsonPreview(after[k], 40),
      );
    }
  }
  return shown ? frag : null;
}

const EVENT_LABEL = { itemAdded: "added", itemUpdated: "updated", itemRemoved: "removed", removed: "map removed", note: "note" };

function clearEventLog() {
  $("events").replaceChildren();
  state.events = 0;
  $("event-count").textContent = "0";
  $("events-empty").hidden = false;
}

function logEvent(type, args) {
  const list = $("events");
  const isLocal = Boolean(args?.isLocal);
  const key = type === "itemRemoved" || type === "removed" ? args?.key : (args?.item?.key ?? args?.key);
  const data = type === "itemRemoved" ? args?.previousItemData : args?.item?.data;
  const now = new Date();
  const li = el(
    "li",
    { class: "fresh", "data-type": type, "data-key": key ?? "", "data-local": String(isLocal) },
    el("span", { class: "ev-type", "data-type": type, text: EVENT_LABEL[type] ?? type }),
    el("span", { class: "ev-key", text: key ?? "", title: key ?? "" }),
    el("span", {
      class: isLocal ? "ev-origin local" : "ev-origin remote",
      text: isLocal ? "local" : "remote",
      title: isLocal ? "is_local: true (made by this page)" : "is_local: false (made elsewhere: another client or node)",
    }),
  );
  const dataLine = el("span", { class: "ev-data", title: data ? jsonTitle(data) : "" });
  if (data) {
    if (type === "itemRemoved") dataLine.append(el("span", { class: "j-punct", text: "was " }));
    const changes = type === "itemUpdated" ? changeSummary(args?.previousItemData, data) : null;
    dataLine.append(changes ?? jsonPreview(data, 160));
  }
  li.append(dataLine, el("time", { class: "ev-time", datetime: now.toISOString(), text: timeFmt.format(now) }));
  if (args?.eventId !== undefined) li.title = `event ${args.eventId}`;
  list.prepend(li);
  while (list.children.length > EVENT_LOG_CAP) list.lastElementChild.remove();
  state.events += 1;
  $("event-count").textContent = String(state.events);
  $("events-empty").hidden = true;
}

// ---------------------------------------------------------------- the item form

function validateData(text) {
  const trimmed = text.trim();
  if (trimmed === "") return { error: "Enter the item's data: a JSON object such as {\"name\": \"value\"}." };
  let value;
  try {
    value = JSON.parse(trimmed);
  } catch (e) {
    return { error: `This is not valid JSON: ${e.message}` };
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    const kind = value === null ? "null" : Array.isArray(value) ? "an array" : `a ${typeof value}`;
    return { error: `The data must be a JSON object ({ … }), not ${kind}.` };
  }
  const bytes = new TextEncoder().encode(JSON.stringify(value)).length;
  if (bytes > MAX_DATA_BYTES) {
    return { error: `The data is ${(bytes / 1024).toFixed(1)} KiB; an item holds at most 16 KiB.` };
  }
  return { value };
}

function validateKey(key) {
  if (key === "") return "Enter a key.";
  if ([...key].length > 320) return "A key has at most 320 characters.";
  if (key === "." || key === "..") return "The keys . and .. cannot be addressed in a URL; pick another.";
  return null;
}

let returnFocus = null;
let returnKey = null;

function openItemDialog(mode, item) {
  if (!state.current) return;
  const dialog = $("item-dialog");
  if (dialog.open) return;
  returnFocus = document.activeElement;
  returnKey = document.activeElement?.closest?.("#items tr")?.dataset.key ?? null;
  const keyInput = $("item-key");
  const data = $("item-data");
  state.editing = { mode, key: item?.key ?? null, attempted: false };
  $("item-form").reset();
  clearItemErrors();
  $("item-save").disabled = false;
  $("item-save").textContent = mode === "add" ? "Add item" : "Save changes";
  $("item-dialog-title").textContent = mode === "add" ? "New item" : `Edit ${item.key}`;
  $("write-mode").hidden = mode === "add";
  keyInput.value = item?.key ?? "";
  keyInput.readOnly = mode === "edit";
  data.value = mode === "add" ? "{\n  \n}" : JSON.stringify(item.data, null, 2);
  const meta = [];
  if (item) {
    if (item.revision) meta.push(`revision ${item.revision}`);
    const up = asDate(item.dateUpdated);
    if (up) meta.push(`updated ${dateFmt.format(up)}`);
    const exp = asDate(item.dateExpires);
    if (exp) meta.push(untilText(exp));
  }
  $("item-meta").textContent = meta.join(" · ");
  dialog.showModal();
  if (mode === "add") keyInput.focus();
  else {
    data.focus();
    data.setSelectionRange(0, 0);
    data.scrollTop = 0;
  }
}

function closeItemDialog() {
  const dialog = $("item-dialog");
  if (dialog.open) dialog.close();
}

function clearItemErrors() {
  showFieldError($("item-key-error"), null, [$("item-key")]);
  showFieldError($("item-data-error"), null, [$("item-data")]);
  showFieldError($("item-ttl-error"), null, [$("item-ttl")]);
}

async function saveItem(ev) {
  ev.preventDefault();
  const ed = state.editing;
  const map = state.current;
  if (!ed || !map) return;
  ed.attempted = true;
  clearItemErrors();
  const keyInput = $("item-key");
  const dataInput = $("item-data");
  const ttlInput = $("item-ttl");
  const key = ed.mode === "edit" ? ed.key : keyInput.value;
  const keyError = validateKey(key);
  const { value, error: dataError } = validateData(dataInput.value);
  const { ttl, error: ttlError } = parseTtl(ttlInput.value);
  if (keyError) showFieldError($("item-key-error"), keyError, [keyInput]);
  if (dataError) showFieldError($("item-data-error"), dataError, [dataInput]);
  if (ttlError) showFieldError($("item-ttl-error"), ttlError, [ttlInput]);
  if (keyError || dataError || ttlError) {
    (keyError ? keyInput : dataError ? dataInput : ttlInput).focus();
    return; // nothing is sent
  }
  const save = $("item-save");
  save.disabled = true;
  save.textContent = "Saving…";
  const meta = ttl !== undefined ? { ttl } : undefined;
  try {
    if (ed.mode === "add") {
      if (await itemExists(map, key)) {
        showFieldError($("item-key-error"), `An item “${key}” already exists: open it from the list to edit it.`, [keyInput]);
        keyInput.focus();
        return;
      }
    }
    const writeMode = new FormData($("item-form")).get("mode");
    const item =
      ed.mode === "edit" && writeMode === "update" ? await map.update(key, value, meta) : await map.set(key, value, meta);
    if (state.editing !== ed) return;
    state.editing = null;
    closeItemDialog();
    if (map === state.current && item) upsertRow(item, true);
    renderPager();
    toast(ed.mode === "add" ? `Added ${key}.` : `Saved ${key}.`);
  } catch (e) {
    if (state.editing !== ed) return;
    showFieldError($("item-data-error"), `The node refused the write: ${errorText(e)}`, []);
  } finally {
    save.disabled = false;
    save.textContent = ed.mode === "add" ? "Add item" : "Save changes";
  }
}

async function itemExists(map, key) {
  if (state.rows.has(key)) return true;
  // A listing from the key rather than a get: a missing item is the normal case here, and
  // should not show up as a failed request.
  const page = await map.getItems({ from: key, pageSize: 1 });
  return page.items.length > 0 && page.items[0].key === key;
}

function formatJson() {
  const { value, error } = validateData($("item-data").value);
  if (error) {
    showFieldError($("item-data-error"), error, [$("item-data")]);
    return;
  }
  showFieldError($("item-data-error"), null, [$("item-data")]);
  $("item-data").value = JSON.stringify(value, null, 2);
}

const revalidate = debounce(() => {
  const ed = state.editing;
  if (!ed || !ed.attempted) return;
  const { error } = validateData($("item-data").value);
  showFieldError($("item-data-error"), error ?? null, [$("item-data")]);
}, 250);

// ---------------------------------------------------------------- confirmations and removal

/**
 * Whether focus already sits somewhere on the page after `dialog` closed: the browser puts it
 * back where it was when the dialog opened, before the queued `close` event runs, and the
 * person may have moved on since. Moving it again then would pull it away from them.
 */
function focusPlaced(dialog) {
  const active = document.activeElement;
  return !!active && active !== document.body && !dialog.contains(active);
}

function confirmDialog(title, text, okLabel) {
  const dialog = $("confirm-dialog");
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  $("confirm-ok").textContent = okLabel;
  const back = document.activeElement;
  return new Promise((resolve) => {
    dialog.returnValue = "";
    dialog.addEventListener(
      "close",
      () => {
        resolve(dialog.returnValue === "ok");
        if (!focusPlaced(dialog) && back && back.isConnected) back.focus();
      },
      { once: true },
    );
    dialog.showModal();
    $("confirm-cancel").focus();
  });
}

async function removeItem(key) {
  const map = state.current;
  if (!map) return;
  const ok = await confirmDialog("Remove this item?", `The item “${key}” is removed on every node that holds this map.`, "Remove item");
  if (!ok || map !== state.current) return;
  try {
    await map.remove(key);
    removeRow(key);
    renderPager();
    toast(`Removed ${key}.`);
  } catch (e) {
    if (e?.code === 54201) {
      removeRow(key);
      renderPager();
      toast(`${key} was already gone.`);
    } else toast(`Could not remove ${key}: ${errorText(e)}`, { error: true });
  }
}

async function removeCurrentMap() {
  const map = state.current;
  if (!map) return;
  const name = map.uniqueName ?? map.sid;
  const ok = await confirmDialog(
    "Remove this map?",
    `The map “${name}” and all its items are removed on every node. This cannot be undone.`,
    "Remove map",
  );
  if (!ok || map !== state.current) return;
  try {
    await map.removeMap();
    if (map === state.current) onMapRemoved(map, { isLocal: true });
  } catch (e) {
    toast(`Could not remove the map: ${errorText(e)}`, { error: true });
  }
}

// ---------------------------------------------------------------- keyboard

function isTyping(target) {
  if (!(target instanceof HTMLElement)) return false;
  if (target.isContentEditable) return true;
  if (target instanceof HTMLTextAreaElement || target instanceof HTMLSelectElement) return true;
  if (target instanceof HTMLInputElement) return !["button", "submit", "reset", "checkbox", "radio"].includes(target.type);
  return false;
}

function focusSearch() {
  if (!state.current) return false;
  const s = $("search");
  s.focus();
  s.select();
  return true;
}

function anyDialogOpen() {
  return [...document.querySelectorAll("dialog")].some((d) => d.open);
}

document.addEventListener("keydown", (ev) => {
  if (ev.defaultPrevented || ev.isComposing) return;
  if (anyDialogOpen()) return; // dialogs handle Esc and their own keys
  if (ev.key === "Escape" && !$("new-map-form").hidden) {
    ev.preventDefault();
    toggleNewMapForm(false);
    return;
  }
  if (ev.ctrlKey || ev.metaKey || ev.altKey || isTyping(ev.target)) return;
  switch (ev.key) {
    case "/":
      if (focusSearch()) ev.preventDefault();
      break;
    case "n":
      if (state.current) {
        ev.preventDefault();
        openItemDialog("add");
      }
      break;
    case "m":
      ev.preventDefault();
      toggleNewMapForm(true);
      break;
    case "i":
      ev.preventDefault();
      openInvite();
      break;
    case "j":
      ev.preventDefault();
      openJoin();
      break;
    case "?":
      ev.preventDefault();
      showShortcuts();
      break;
    case "[":
      if (!$("prev-page").disabled) loadItems("prev");
      break;
    case "]":
      if (!$("next-page").disabled) loadItems("next");
      break;
    default:
  }
});

function showShortcuts() {
  const d = $("shortcuts-dialog");
  if (!d.open) d.showModal();
}

function moveFocus(list, current, delta) {
  const i = list.indexOf(current);
  if (i < 0) return false;
  const next = list[Math.min(list.length - 1, Math.max(0, i + delta))];
  if (next && next !== current) next.focus();
  return true;
}

// ---------------------------------------------------------------- wiring

$("items").addEventListener("click", (ev) => {
  const button = ev.target.closest("button[data-action]");
  const tr = ev.target.closest("tr[data-key]");
  if (!button || !tr) return;
  const key = tr.dataset.key;
  if (button.dataset.action === "remove") removeItem(key);
  else {
    const row = state.rows.get(key);
    if (row) openItemDialog("edit", row.item);
  }
});

$("items").addEventListener("keydown", (ev) => {
  const tr = ev.target.closest("tr[data-key]");
  if (!tr || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const action = ev.target.dataset?.action;
  if (ev.key === "ArrowDown" || ev.key === "ArrowUp") {
    const selector = action === "remove" ? '[data-action="remove"]' : ".key-button";
    const cells = [...$("items").querySelectorAll(selector)];
    const here = tr.querySelector(selector);
    if (moveFocus(cells, here, ev.key === "ArrowDown" ? 1 : -1)) ev.preventDefault();
    if (ev.key === "ArrowUp" && cells[0] === here) $("search").focus();
  } else if (ev.key === "Delete" || ev.key === "Backspace") {
    ev.preventDefault();
    removeItem(tr.dataset.key);
  }
});

$("maps").addEventListener("keydown", (ev) => {
  if (ev.key !== "ArrowDown" && ev.key !== "ArrowUp") return;
  const links = [...$("maps").querySelectorAll("a")];
  if (moveFocus(links, ev.target.closest("a"), ev.key === "ArrowDown" ? 1 : -1)) ev.preventDefault();
});

$("maps").addEventListener("click", (ev) => {
  const a = ev.target.closest("a[data-sid]");
  // Opening the map that is already in the address bar (e.g. after it failed) retries it.
  if (a && location.hash === a.getAttribute("href") && !state.current) openMap(a.dataset.sid);
});

const searchNow = () => {
  const prefix = $("search").value;
  if (prefix === state.prefix) return;
  state.prefix = prefix;
  loadItems("first");
};
const searchSoon = debounce(searchNow, 200);

$("search").addEventListener("input", searchSoon);
$("search").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter") {
    ev.preventDefault();
    searchNow();
  } else if (ev.key === "Escape") {
    ev.preventDefault();
    if ($("search").value) {
      $("search").value = "";
      searchNow();
    } else $("search").blur();
  } else if (ev.key === "ArrowDown") {
    const first = $("items").querySelector(".key-button");
    if (first) {
      ev.preventDefault();
      first.focus();
    }
  }
});

$("page-size").addEventListener("change", () => {
  state.pageSize = Number($("page-size").value) || 25;
  loadItems("first");
});
$("prev-page").addEventListener("click", () => loadItems("prev"));
$("next-page").addEventListener("click", () => loadItems("next"));
$("new-item-button").addEventListener("click", () => openItemDialog("add"));
$("remove-map-button").addEventListener("click", removeCurrentMap);
$("refresh-maps").addEventListener("click", () => loadMaps());
$("maps-more").addEventListener("click", () => loadMaps({ more: true }));
$("new-map-button").addEventListener("click", () => toggleNewMapForm($("new-map-form").hidden));
$("new-map-form").addEventListener("submit", createMap);
$("new-map-form").querySelector("[data-cancel]").addEventListener("click", () => toggleNewMapForm(false));
$("clear-events").addEventListener("click", clearEventLog);

for (const id of ["invite-dialog", "join-dialog", "trust-dialog"]) wireDialog(id);
$("invite-button").addEventListener("click", openInvite);
$("join-button").addEventListener("click", openJoin);
$("trust-button").addEventListener("click", openTrust);
$("invite-form").addEventListener("submit", createInvite);
$("join-form").addEventListener("submit", joinWithTicket);
$("trust-form").addEventListener("submit", trustPeerId);
$("invite-copy").addEventListener("click", () => copyText($("invite-ticket").value, "the ticket"));
$("join-ticket").addEventListener("keydown", (ev) => {
  // A ticket is one line: Enter joins rather than starting a new line.
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("join-form").requestSubmit();
  }
});
$("trusted-peers").addEventListener("click", (ev) => {
  const button = ev.target.closest("button[data-action=untrust]");
  const id = button?.closest("li[data-peer-id]")?.dataset.peerId;
  if (id) untrustPeer(id);
});
$("shortcuts-button").addEventListener("click", showShortcuts);

$("item-form").addEventListener("submit", saveItem);
$("item-data").addEventListener("input", revalidate);
$("item-data").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
    ev.preventDefault();
    $("item-form").requestSubmit();
  }
});
$("format-json").addEventListener("click", formatJson);
for (const b of $("item-dialog").querySelectorAll("[data-cancel]")) b.addEventListener("click", closeItemDialog);
$("item-dialog").addEventListener("close", () => {
  // The event is queued: the form may already be open again for something else.
  if ($("item-dialog").open) return;
  state.editing = null;
  const back = returnFocus;
  const key = returnKey;
  returnFocus = null;
  returnKey = null;
  if (focusPlaced($("item-dialog"))) return;
  // A row may have been redrawn while the form was open: return to its new self.
  const row = key !== null ? state.rows.get(key)?.tr.querySelector(".key-button") : null;
  if (back && back.isConnected && back !== document.body) back.focus();
  else if (row) row.focus();
  else if (state.current) $("new-item-button").focus();
});

window.addEventListener("hashchange", route);
setInterval(refreshTimes, 15_000);

renderConnection();
pollNode();
loadMaps();
route();
