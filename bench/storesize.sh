#!/usr/bin/env bash
# The store's size on disk after many persisted progress reports, against the live data it holds.
#
#   bench/storesize.sh [DEVICES] [REPORTS_PER_DEVICE]    (default 10000 devices, 1000 reports each)
#
# DEVICES simulated gateways (bench/mqttload.rs), one campaign for the fleet; each device then
# sends REPORTS_PER_DEVICE progress reports at QoS 1 in rounds of 10 (progress climbing to 99,
# then the same progress again: each report is persisted, as a history entry or as the task's
# last activity). Afterwards: the store directory's size (du) while the appliance runs and again
# after a restart, and the live data: the bytes of every key and value in the store, read from
# an online backup (`store.jsonl` holds them hex-encoded). Goal: on disk <= 3x the live data.
set -euo pipefail
N=${1:-10000}
PER=${2:-1000}
BURST=10
ROUNDS=$(( (PER + BURST - 1) / BURST ))
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
source "$(dirname "$0")/lib.sh"
(cd "$ROOT" && cargo build --release -q --bench mqttload)
LOAD=$(ls -t "$ROOT"/target/release/deps/mqttload-* | grep -v '\.d$' | head -1)
hangar_toml "$WORK" "max_connections = $((N + 100))"
hangar_start "$WORK"
python3 - "$N" > "$WORK/devices.json" <<'PY'
import json, sys
n = int(sys.argv[1])
print(json.dumps([{"id": f"B{i:05d}", "protocol": "gateway", "secret": f"bench-secret-{i}"} for i in range(n)]))
PY
CLI=("$HANGAR" --config "$WORK/hangar.toml")
"${CLI[@]}" device import "$WORK/devices.json" >/dev/null
head -c 100000 /dev/urandom > "$WORK/fw.bin"
"${CLI[@]}" firmware upload "$WORK/fw.bin" --version 1.0.2 >/dev/null
"${CLI[@]}" firmware release 1.0.2 >/dev/null
HPORT=$(port_of "$WORK" https)
MQPORT=$(port_of "$WORK" mqtt)
t0=$(date +%s)
"$LOAD" --target hangar --engine direct --port "$MQPORT" --devices "$N" --burst "$BURST" --rounds "$ROUNDS" \
  --server-pid "$HPID" --create campaign --api "https://127.0.0.1:$HPORT" \
  --token "$(cat "$WORK/hangar/admin.token")" --ca "$WORK/hangar/certs/ca.pem" > "$WORK/load.json"
t1=$(date +%s)
du_store() { du -sb "$WORK/hangar/store" | cut -f1; }
running=$(du_store)
"${CLI[@]}" backup --out "$WORK/backup.tar" >/dev/null
tar -xf "$WORK/backup.tar" -C "$WORK" store.jsonl
kill "$HPID"; wait "$HPID" 2>/dev/null || true
hangar_start "$WORK"
restarted=$(du_store)
python3 - "$WORK" "$N" "$PER" "$running" "$restarted" "$((t1 - t0))" <<'PY'
import json, sys
work, n, per, running, restarted, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
load = json.load(open(f"{work}/load.json"))
live = 0
trees = {}
for line in open(f"{work}/store.jsonl"):
    r = json.loads(line)
    b = (len(r["key"]) + len(r["value"])) // 2
    live += b
    trees[r["tree"]] = trees.get(r["tree"], 0) + b
top = ", ".join(f"{t} {b/1e6:.1f} MB" for t, b in sorted(trees.items(), key=lambda x: -x[1])[:3])
print(f"| {n} devices x {per} reports = {load['reports_total']} persisted | live data {live/1e6:.1f} MB ({top}) "
      f"| on disk running {running/1e6:.1f} MB ({running/live:.2f}x) | after restart {restarted/1e6:.1f} MB ({restarted/live:.2f}x) "
      f"| {secs} s, {load['reports_per_s']:.0f} reports/s, {load['errors']} client errors |")
PY
