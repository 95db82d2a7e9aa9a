#!/usr/bin/env bash
# HTTP load benchmark of a release-built `syncmesh node`: wrk against the GET and POST item
# routes with 64 connections. Figures go to docs/benchmarks.md by hand, with the machine.
#
#   scripts/bench-http.sh                 # durable node (fsync), 10 s per run
#   DURABILITY=relaxed DURATION=20s scripts/bench-http.sh
#
# Needs wrk (Debian: apt-get install -y wrk). Traffic goes to 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
ITEMS=${ITEMS:-10000}
DURABILITY=${DURABILITY:-fsync}

command -v wrk >/dev/null || { echo "needs wrk: apt-get install -y wrk" >&2; exit 1; }
# SYNCMESH_BIN=path compares another build of the binary; by default, build this one.
if [ -n "${SYNCMESH_BIN:-}" ]; then
  BIN=$SYNCMESH_BIN
else
  cargo build --release -p syncmesh-cli >&2
  BIN=$PWD/target/release/syncmesh
fi

TMP=$(mktemp -d)
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null; rm -rf "$TMP"; }
trap cleanup EXIT

RUST_LOG=warn "$BIN" node --http 127.0.0.1:0 --data-dir "$TMP/data" --durability "$DURABILITY" \
  --ready-file "$TMP/ready.json" >/dev/null 2>"$TMP/node.log" &
PID=$!
for _ in $(seq 300); do [ -s "$TMP/ready.json" ] && break; sleep 0.1; done
ADDR=$(sed -E 's/.*"http_addr":"([^"]+)".*/\1/' "$TMP/ready.json")
NODE="http://$ADDR"
echo "node $NODE, durability $DURABILITY, $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"

# Seed the map with $ITEMS items: k0 .. k{ITEMS-1}.
seq 0 $((ITEMS - 1)) | awk '{printf "{\"key\":\"k%d\",\"data\":{\"phone_number\":%d,\"country\":\"UK\",\"n\":%d}}\n", $1, $1, $1}' \
  | "$BIN" --node "$NODE" import bench >&2

cat > "$TMP/get.lua" <<LUA
request = function()
  return wrk.format("GET", "/v1/Services/default/Maps/bench/Items/k" .. math.random(0, $ITEMS - 1))
end
LUA
cat > "$TMP/post_new.lua" <<'LUA'
local n = 0
local tid = 0
local threads = 0
function setup(thread) threads = threads + 1; thread:set("tid", threads) end
request = function()
  n = n + 1
  return wrk.format("POST", "/v1/Services/default/Maps/bench/Items/new" .. tid .. "_" .. n,
    {["Content-Type"] = "application/json"},
    '{"Data":{"phone_number":12345678,"country":"UK","n":' .. n .. '}}')
end
LUA
cat > "$TMP/post_overwrite.lua" <<LUA
local n = 0
request = function()
  n = n + 1
  return wrk.format("POST", "/v1/Services/default/Maps/bench/Items/k" .. math.random(0, $ITEMS - 1),
    {["Content-Type"] = "application/json"},
    '{"Data":{"phone_number":12345678,"country":"IRL","n":' .. n .. '}}')
end
LUA

run() {
  echo
  echo "== $1: wrk -t$THREADS -c$CONNS -d$DURATION --latency"
  wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency -s "$TMP/$2" "$NODE"
}
run "GET one item (random key of $ITEMS)" get.lua
run "POST new item (set, creating)" post_new.lua
run "POST existing item (set, replacing)" post_overwrite.lua
