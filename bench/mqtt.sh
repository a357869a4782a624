#!/usr/bin/env bash
# Hangar's MQTT path vs mosquitto 2, side by side in one run, with the same load generator
# (bench/mqttload.rs: rumqttc, QoS 1, TCP_NODELAY) and the same N simulated gateways.
#
#   bench/mqtt.sh [DEVICES] [BURST]      (default 10000 devices, 5 extra reports each)
#   CREATE=api bench/mqtt.sh ...          tasks created one HTTPS call per device (default:
#                                         one campaign for the fleet)
#   HANGAR_BIN=path bench/mqtt.sh ...     measure this hangar binary (A/B runs of two builds)
#
# mosquitto: listener on 127.0.0.1, allow_anonymous, max_connections -1, persistence false,
#   max_queued_messages 0, max_inflight_messages 20 (as ../shared/bench/README.md). The bare
#   round trip: a collector publishes one command per device; each device answers with a report.
# Hangar: release build; N devices registered; one upgrade task per device created through the
#   HTTPS API; each device answers the command with an ota_progress report, counted when its
#   PUBACK returns (Hangar acknowledges only after the report is persisted).
# Prints a markdown table (ratios Hangar/mosquitto) and the raw JSON lines.
set -euo pipefail
BURST=${2:-5}
CREATE=${CREATE:-campaign}
# Raise the descriptor limit as far as this machine allows. Hangar needs 1 descriptor per device.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
FDS=$(ulimit -n)
MAXN=$(( FDS - 200 ))
N=${1:-10000}
if [ "$N" -gt "$MAXN" ]; then
  echo "note: the open-file limit here is $FDS, so Hangar can hold $MAXN devices, not $N; using $MAXN for both" >&2
  N=$MAXN
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

if ! command -v mosquitto >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq mosquitto >/dev/null
fi
MOSQ=$(command -v mosquitto || echo /usr/sbin/mosquitto)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

if [ -z "${HANGAR_BIN:-}" ]; then (cd "$ROOT" && cargo build --release -q); fi
(cd "$ROOT" && cargo build --release -q --bench mqttload)
HANGAR=${HANGAR_BIN:-$ROOT/target/release/hangar}
LOAD=$(ls -t "$ROOT"/target/release/deps/mqttload-* | grep -v '\.d$' | head -1)

# --- mosquitto ---------------------------------------------------------------------------
MPORT=$(free_port)
cat > "$WORK/mosquitto.conf" <<CONF
listener $MPORT 127.0.0.1
allow_anonymous true
max_connections -1
persistence false
max_queued_messages 0
max_inflight_messages 20
log_dest none
CONF
if [ -n "${SKIP_MOSQUITTO:-}" ]; then  # while iterating on Hangar only: no ratios
  MOSQ_JSON='{"devices":'$N',"connect_s":0,"round_trip_s":0,"reports_per_s":0,"reports_total":'$((N * (BURST + 1)))',"server_bytes_per_idle_device":0}'
else
"$MOSQ" -c "$WORK/mosquitto.conf" &
MPID=$!; PIDS+=($MPID)
sleep 0.5
MOSQ_JSON=$("$LOAD" --target mosquitto --port "$MPORT" --devices "$N" --burst "$BURST" --server-pid "$MPID")
kill "$MPID"; wait "$MPID" 2>/dev/null || true
fi

# --- Hangar --------------------------------------------------------------------------------
cat > "$WORK/hangar.toml" <<CONF
data_dir = "$WORK/hangar"
[http]
listen = "127.0.0.1:0"
plain_listen = ""
[mqtt]
listen = "127.0.0.1:0"
tls_listen = ""
max_connections = $((N + 100))
# every simulated device connects from 127.0.0.1 at once: the pre-auth gate's per-address cap
# is raised as the README says for devices behind one NAT address
max_pending_per_address = $((N + 100))
# and the gate's global budget too: a whole fleet logging in the same second is what this bench
# measures (mosquitto has no such gate); the default budget would close the oldest unread ones
max_pending_connections = $((N + 100))
CONF
RUST_LOG=${HANGAR_LOG:-hangar=warn} "$HANGAR" serve --config "$WORK/hangar.toml" 2>"${HANGAR_STDERR:-/dev/stderr}" &
HPID=$!; PIDS+=($HPID)
for _ in $(seq 100); do [ -s "$WORK/hangar/ports.json" ] && break; sleep 0.1; done
python3 - "$N" > "$WORK/devices.json" <<'PY'
import json, sys
n = int(sys.argv[1])
print(json.dumps([{"id": f"B{i:05d}", "protocol": "gateway", "secret": f"bench-secret-{i}"} for i in range(n)]))
PY
"$HANGAR" --config "$WORK/hangar.toml" device import "$WORK/devices.json" >/dev/null
head -c 100000 /dev/urandom > "$WORK/fw.bin"
"$HANGAR" --config "$WORK/hangar.toml" firmware upload "$WORK/fw.bin" --version 1.0.2 >/dev/null
"$HANGAR" --config "$WORK/hangar.toml" firmware release 1.0.2 >/dev/null
read -r HPORT MQPORT < <(python3 -c "import json;p=json.load(open('$WORK/hangar/ports.json'));print(p['https'],p['mqtt'])")
HANG_JSON=$("$LOAD" --target hangar --engine direct --port "$MQPORT" --devices "$N" --burst "$BURST" --server-pid "$HPID" \
  --create "$CREATE" --api "https://127.0.0.1:$HPORT" --token "$(cat "$WORK/hangar/admin.token")" --ca "$WORK/hangar/certs/ca.pem")
# every device's task must hold its last report: none lost
python3 - "$WORK" "$N" "$BURST" "$HPORT" <<'PY' >&2
import json, ssl, sys, urllib.request
work, n, burst, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ctx = ssl.create_default_context(cafile=f"{work}/hangar/certs/ca.pem")
tok = open(f"{work}/hangar/admin.token").read().strip()
req = urllib.request.Request(f"https://127.0.0.1:{port}/api/ota/tasks?limit=10000&status=downloading", headers={"Authorization": f"Bearer {tok}"})
tasks = json.load(urllib.request.urlopen(req, context=ctx))["data"]
full = sum(1 for t in tasks if t["progress"] == 1 + burst)
print(f"hangar: {len(tasks)} tasks downloading, {full} with progress {1+burst} (the last report)")
PY

# --- table -----------------------------------------------------------------------------
python3 - "$MOSQ_JSON" "$HANG_JSON" <<'PY'
import json, sys
m, h = json.loads(sys.argv[1]), json.loads(sys.argv[2])
r = lambda a, b: f"{a / b:.2f}" if b else "-"
print(f"| {m['devices']} devices, loopback | mosquitto 2 | Hangar ({h['engine']}, tasks by {h['create']}) | Hangar/mosquitto | goal |")
print("| --- | ---: | ---: | ---: | --- |")
print(f"| connect all devices, s | {m['connect_s']:.2f} | {h['connect_s']:.2f} | {r(h['connect_s'], m['connect_s'])} | <= 2.0 |")
print(f"| command to every device + one report back, s (Hangar: task created + persisted + delivered + report persisted) | {m['round_trip_s']:.2f} | {h['round_trip_s']:.2f} | {r(h['round_trip_s'], m['round_trip_s'])} | <= 1.0 |")
print(f"| burst: {m['devices']} devices x {m['reports_total'] // m['devices'] - 1} progress reports at once, reports/s (Hangar: persisted) | {m['reports_per_s']:.0f} | {h['reports_per_s']:.0f} | {r(h['reports_per_s'], m['reports_per_s'])} | Hangar >= 30000/s, none lost |")
print(f"| server memory per idle connected device, bytes | {m['server_bytes_per_idle_device']} | {h['server_bytes_per_idle_device']} | {r(h['server_bytes_per_idle_device'], m['server_bytes_per_idle_device'])} | <= 10 KB |")
print()
print("mosquitto:", json.dumps(m))
print("hangar:   ", json.dumps(h))
PY
