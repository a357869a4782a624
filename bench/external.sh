#!/usr/bin/env bash
# The same fleet on Hangar's own broker and on the site's mosquitto (mqtt.engine = "external"),
# side by side, ROUNDS interleaved rounds, with the same load generator (bench/mqttload.rs).
#
#   bench/external.sh [DEVICES] [ROUNDS]     (default 10000 devices, 3 rounds)
#
# Every device announces itself once connected (a heartbeat, as the tutorial's gateways do) and
# the appliance stored them all before the clock starts, in both runs.
# Fleet round trip: one campaign for the whole fleet created -> every device's first report
# persisted (own broker: its PUBACK, which Hangar sends after the flush; external: Hangar's
# acknowledgement to mosquitto, hangar_site_broker_acks_sent, also after the flush). Burst: 5
# more reports per device at once, persisted reports/s. Goal: external/own <= 1.5.
# mosquitto: Debian's 2.0, anonymous clients (the devices), max_inflight_messages 1000 and
# max_queued_messages 0 (what docs/scale-out.md asks of a site broker Hangar rides).
set -euo pipefail
N=${1:-10000}
ROUNDS=${2:-3}
BURST=5
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
source "$(dirname "$0")/lib.sh"
command -v mosquitto >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; }
(cd "$ROOT" && cargo build --release -q --bench mqttload)
LOAD=$(ls -t "$ROOT"/target/release/deps/mqttload-* | grep -v '\.d$' | head -1)

python3 - "$N" > "$WORK/devices.json" <<'PY'
import json, sys
n = int(sys.argv[1])
print(json.dumps([{"id": f"B{i:05d}", "protocol": "gateway", "secret": f"bench-secret-{i}"} for i in range(n)]))
PY
head -c 100000 /dev/urandom > "$WORK/fw.bin"

# run ENGINE ROUND: one Hangar (and for "external" one mosquitto), the fleet, one JSON line
run() {
  local engine=$1 dir="$WORK/$1-$2" mport="" mpid="" extra="" port
  mkdir -p "$dir"
  if [ "$engine" = external ]; then
    mport=$(free_port)
    printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_connections -1\npersistence false\nmax_queued_messages 0\nmax_inflight_messages 1000\nlog_dest none\n' "$mport" > "$dir/mosquitto.conf"
    mosquitto -c "$dir/mosquitto.conf" & mpid=$!; PIDS+=("$mpid")
    extra=$(printf 'engine = "external"\n[mqtt.external]\nurl = "mqtt://127.0.0.1:%s"\nclient_id = "hangar-bench"\n' "$mport")
  fi
  hangar_toml "$dir" "max_connections = $((N + 100))
$extra"
  hangar_start "$dir" >&2; local hpid=$HPID
  "$HANGAR" --config "$dir/hangar.toml" device import "$WORK/devices.json" >/dev/null
  "$HANGAR" --config "$dir/hangar.toml" firmware upload "$WORK/fw.bin" --version 1.0.2 >/dev/null
  "$HANGAR" --config "$dir/hangar.toml" firmware release 1.0.2 >/dev/null
  local hport mqport; hport=$(port_of "$dir" https); mqport=$(port_of "$dir" mqtt)
  port=$mqport; [ "$engine" = external ] && port=$mport
  "$LOAD" --target hangar --engine "$engine" --port "$port" --devices "$N" --burst "$BURST" \
    --server-pid "$hpid" --create campaign --announce --api "https://127.0.0.1:$hport" \
    --token "$(cat "$dir/hangar/admin.token")" --ca "$dir/hangar/certs/ca.pem" > "$dir/result.json"
  local hwm; hwm=$(awk '/VmHWM/{print $2}' "/proc/$hpid/status")
  kill "$hpid"; wait "$hpid" 2>/dev/null || true
  [ -n "$mpid" ] && { kill "$mpid"; wait "$mpid" 2>/dev/null || true; }
  python3 -c "import json,sys; d=json.load(open('$dir/result.json')); d['hangar_hwm_kb']=$hwm; print(json.dumps(d))"
}

: > "$WORK/all.jsonl"
for r in $(seq "$ROUNDS"); do
  for engine in direct external; do
    run "$engine" "$r" | tee -a "$WORK/all.jsonl"
  done
done
python3 - "$WORK/all.jsonl" "$N" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
own = [r for r in rows if r["engine"] == "direct"]
ext = [r for r in rows if r["engine"] == "external"]
rt = [e["round_trip_s"] / o["round_trip_s"] for o, e in zip(own, ext)]
bu = [e["reports_per_s"] / o["reports_per_s"] for o, e in zip(own, ext)]
f = lambda xs: ", ".join(f"{x:.2f}" for x in xs)
print(f"| {sys.argv[2]} devices | own broker | on mosquitto | external/own, per round | median | goal |")
print("| --- | --- | --- | --- | ---: | --- |")
print(f"| fleet round trip, s | {f([o['round_trip_s'] for o in own])} | {f([e['round_trip_s'] for e in ext])} | {f(rt)} | {statistics.median(rt):.2f} | <= 1.5 |")
print(f"| burst, persisted reports/s | {', '.join(str(round(o['reports_per_s'])) for o in own)} | {', '.join(str(round(e['reports_per_s'])) for e in ext)} | {f(bu)} | {statistics.median(bu):.2f} | - |")
print(f"| Hangar peak RSS, MB | {', '.join(str(o['hangar_hwm_kb'] // 1024) for o in own)} | {', '.join(str(e['hangar_hwm_kb'] // 1024) for e in ext)} | | | |")
PY
