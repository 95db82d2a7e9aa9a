// Test support: real `syncmesh node` processes on 127.0.0.1 (port 0, temp dirs), and waiting
// on conditions with generous deadlines (the machines are shared and slow; a deadline bounds a
// wait, it is never the criterion).
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, openSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { createInterface } from "node:readline";

export const DEADLINE_MS = 90_000;
const here = dirname(fileURLToPath(import.meta.url));
export const REPO = join(here, "..", "..", "..", "..");

/** The `syncmesh` binary: $SYNCMESH_BIN (set by the cargo test that runs these), else target/debug. */
export function binary() {
  return process.env.SYNCMESH_BIN || join(REPO, "target", "debug", "syncmesh");
}

/**
 * Starts `syncmesh node` on a fresh data directory with `args`; resolves once it reports its
 * HTTP address. `node.url` is its base URL; `node.stop()` ends it (SIGTERM) and waits.
 */
export async function startNode(args = [], { dir } = {}) {
  const root = dir ?? mkdtempSync(join(tmpdir(), "syncmesh-js-"));
  const log = openSync(join(root, "node.log"), "a");
  const proc = spawn(
    binary(),
    [
      "node",
      "--data-dir",
      join(root, "data"),
      "--no-mdns",
      "--listen",
      "/ip4/127.0.0.1/tcp/0",
      ...(args.includes("--http") ? [] : ["--http", "127.0.0.1:0"]),
      ...args,
    ],
    { stdio: ["ignore", "pipe", log], env: cleanEnv() },
  );
  const url = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`node did not start; see ${root}/node.log`)), DEADLINE_MS);
    proc.once("exit", (code) => reject(new Error(`node exited with ${code}; see ${root}/node.log`)));
    createInterface({ input: proc.stdout }).on("line", (line) => {
      const m = line.match(/listening on (http:\/\/\S+)/);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
  });
  const exited = new Promise((resolve) => proc.once("exit", resolve));
  return {
    url,
    dir: root,
    proc,
    /** Stops the node (SIGTERM) and waits for it to exit. */
    async stop() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGTERM");
      await exited;
    },
    /** Kills it without warning. */
    async kill() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGKILL");
      await exited;
    },
    /** Removes its data directory (after stop). */
    cleanup() {
      rmSync(root, { recursive: true, force: true });
    },
  };
}

function cleanEnv() {
  const env = { ...process.env, RUST_LOG: "warn" };
  delete env.SYNCMESH_TOKEN;
  delete env.SYNCMESH_NODE;
  return env;
}

/** GET /v1/Node of a node. */
export async function nodeStatus(url, token) {
  const r = await fetch(`${url}/v1/Node`, { headers: token ? { authorization: `Bearer ${token}` } : {} });
  if (!r.ok) throw new Error(`GET /v1/Node: ${r.status}`);
  return r.json();
}

/**
 * Makes two nodes trust each other the way people do: an invitation on `a` (POST
 * /v1/Node/Invites), joined from `b` (POST /v1/Node/Join). Resolves once they are connected.
 */
export async function trustEachOther(a, b, { token } = {}) {
  const headers = { "content-type": "application/json", ...(token ? { authorization: `Bearer ${token}` } : {}) };
  const inv = await fetch(`${a.url}/v1/Node/Invites`, { method: "POST", headers, body: "{}" });
  if (inv.status !== 201) throw new Error(`invite: ${inv.status} ${await inv.text()}`);
  const { ticket } = await inv.json();
  const joined = await fetch(`${b.url}/v1/Node/Join`, { method: "POST", headers, body: JSON.stringify({ Ticket: ticket }) });
  if (joined.status !== 201) throw new Error(`join: ${joined.status} ${await joined.text()}`);
  const peerA = (await nodeStatus(a.url, token)).peer_id;
  await waitFor("B connected to A", async () => (await nodeStatus(b.url, token)).connected_peers.includes(peerA));
}

/** Waits until `cond()` (sync or async) is truthy; fails with `what` after the deadline. */
export async function waitFor(what, cond, deadline = DEADLINE_MS) {
  const end = Date.now() + deadline;
  let delay = 10;
  for (;;) {
    let v;
    try {
      v = await cond();
    } catch (e) {
      v = undefined;
      if (Date.now() > end) throw new Error(`timed out waiting for ${what}: ${e}`);
    }
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, delay));
    delay = Math.min(delay * 2, 250);
  }
}
