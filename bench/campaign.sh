#!/usr/bin/env bash
# A campaign end to end: 1,000 simulated gateways (`hangar sim`, one process) on the esbuild
# 0.20.0 image (9.6 MB, from the corpus), upgraded to 0.20.1 by one campaign (waves [10, 100],
# maxInFlight 1000) with the delta available, on loopback. Reports the wall time from campaign
# creation to `completed`, its split (command fan-out, downloads, reports), and the appliance's
# peak RSS (VmHWM). Goals (issue E): under 30 s, appliance RSS under 200 MB.
#
#   bench/campaign.sh [DEVICES] [CORPUS_DIR]     (defaults 1000, ${TMPDIR:-/tmp}/hangar-corpus)
#   HANGAR_BIN=path bench/campaign.sh ...       measure this hangar binary (A/B runs of two builds)
#   HANGAR_SIM_FRESH_CONNECTIONS=1 ...          each simulated download on a new connection (a TLS
#                                               handshake each) instead of the simulator's pool
set -euo pipefail
N=${1:-1000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CORPUS=${2:-${TMPDIR:-/tmp}/hangar-corpus}
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

if ! ls "$CORPUS"/esbuild-x64-patch/old.bin >/dev/null 2>&1; then
  bash "$ROOT/../shared/bench/fetch-corpus.sh" "$CORPUS" >/dev/null
fi
if [ -z "${HANGAR_BIN:-}" ]; then (cd "$ROOT" && cargo build --release -q); fi
HANGAR=${HANGAR_BIN:-$ROOT/target/release/hangar}
printf 'data_dir = "%s/data"\n[http]\nlisten = "127.0.0.1:0"\nplain_listen = "127.0.0.1:0"\n[mqtt]\nlisten = "127.0.0.1:0"\ntls_listen = "127.0.0.1:0"\n' \
  "$WORK" > "$WORK/hangar.toml"
RUST_LOG=hangar=warn "$HANGAR" serve --config "$WORK/hangar.toml" 2>"$WORK/serve.log" &
SERVE=$!
PIDS+=("$SERVE")
for _ in $(seq 300); do [ -s "$WORK/data/ports.json" ] && break; sleep 0.1; done
H() { "$HANGAR" --config "$WORK/hangar.toml" "$@"; }
HTTPS=$(python3 -c "import json;print(json.load(open('$WORK/data/ports.json'))['https'])")
api() { curl -sf --cacert "$WORK/data/certs/ca.pem" -H "Authorization: Bearer $(cat "$WORK/data/admin.token")" \
  -H 'content-type: application/json' "https://127.0.0.1:$HTTPS$1" "${@:2}"; }
jq_py() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

H firmware upload "$CORPUS/esbuild-x64-patch/old.bin" --version 0.20.0 >/dev/null 2>&1
H firmware release 0.20.0 >/dev/null
"$HANGAR" --config "$WORK/hangar.toml" sim --devices "$N" --version 0.20.0 --register --until-idle \
  --idle-secs 3 --timeout 600 --summary-every 0 > "$WORK/sim.out" 2>"$WORK/sim.err" &
SIM=$!
PIDS+=("$SIM")
for _ in $(seq 600); do
  online=$(api /api/ota/statistics | jq_py "d['data']['onlineDevices']")
  [ "$online" -ge "$N" ] && break; sleep 0.5
done
H firmware upload "$CORPUS/esbuild-x64-patch/new.bin" --version 0.20.1 >/dev/null 2>&1
H firmware release 0.20.1 >/dev/null
for _ in $(seq 600); do
  st=$(api "/api/ota/firmware/0.20.1/deltas" | jq_py "d['data'][0]['status'] if d['data'] else ''")
  [ "$st" = ready ] && break; sleep 0.2
done
T0=$(date +%s%N)
ID=$(api /api/ota/campaigns -d '{"name":"bench","version":"0.20.1","targets":{"all":true},"waves":[10,100],"successThreshold":90,"maxInFlight":1000}' | jq_py "d['data']['id']")
while :; do
  st=$(api "/api/ota/campaigns/$ID" | jq_py "d['data']['status']")
  [ "$st" = completed ] && break; sleep 0.2
done
T1=$(date +%s%N)
HWM=$(awk '/VmHWM/ {print $2}' "/proc/$SERVE/status")
api "/api/ota/campaigns/$ID" > "$WORK/campaign.json"
api "/api/ota/tasks?limit=10000" > "$WORK/tasks.json"
wait "$SIM" || true
python3 - "$WORK" "$T0" "$T1" "$HWM" "$N" <<'PY'
import json, sys, datetime
work, t0, t1, hwm, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
ms = lambda s: datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() * 1000
tasks = json.load(open(f"{work}/tasks.json"))["data"]
c = json.load(open(f"{work}/campaign.json"))["data"]
created = t0 / 1e6
starts = [ms(t["startTime"]) for t in tasks]
def first(t, st):
    for e in t["events"]:
        if e["status"] == st:
            return ms(e["at"])
verif = [v for v in (first(t, "verifying") or first(t, "installing") for t in tasks) if v]
done = [ms(t["completeTime"]) for t in tasks]
sim = json.loads(open(f"{work}/sim.out").read().strip().splitlines()[-1])
total = (t1 - t0) / 1e9
print("| devices | campaign wall time (goal < 30 s) | command fan-out (create -> last command) | downloads + patching (first command -> last verified) | reports (last verified -> last completed) | appliance peak RSS (goal < 200 MB) | completed | deltas used |")
print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
print(f"| {n} | **{total:.1f} s** | {(max(starts)-created)/1000:.1f} s | {(max(verif)-min(starts))/1000:.1f} s | "
      f"{(max(done)-max(verif))/1000:.1f} s | **{hwm/1024:.0f} MB** | {c['counts']['completed']} | {sim['deltaUsed']} |")
PY
