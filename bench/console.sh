#!/usr/bin/env bash
# The web console under a fleet: 10,000 registered devices (imported; offline) plus 200 simulated
# gateways downloading slowly, and a campaign over all of them running. Measures, on loopback:
#  - server-side render time of the fleet page (`/`, the device table's first and last page) and
#    of the campaign page, median of RUNS interleaved requests each, beside the JSON API's
#    device list (`GET /api/ota/devices?limit=10000`, the same data without HTML) as a reference;
#  - what 20 browsers following the campaign's event stream (`GET /api/events`) cost the
#    appliance: its CPU time over WINDOW seconds with no subscriber and with 20, interleaved
#    ROUNDS times, as % of one core;
#  - the appliance's RSS before anyone opened the console and after the pages and the 20
#    streams (VmRSS).
# Goals: pages <= 100 ms, 20 subscribers <= 5 % of one core, console <= 10 MB of RSS.
#
#   bench/console.sh [RUNS] [ROUNDS] [WINDOW]     (defaults 15, 3, 20)
#   HANGAR_BIN=path bench/console.sh ...         measure this hangar binary
set -euo pipefail
RUNS=${1:-15}
ROUNDS=${2:-3}
WINDOW=${3:-20}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
if [ -z "${HANGAR_BIN:-}" ]; then (cd "$ROOT" && cargo build --release -q); fi
HANGAR=${HANGAR_BIN:-$ROOT/target/release/hangar}
printf 'data_dir = "%s/data"\n[http]\nlisten = "127.0.0.1:0"\nplain_listen = "127.0.0.1:0"\n[mqtt]\nlisten = "127.0.0.1:0"\ntls_listen = ""\n' \
  "$WORK" > "$WORK/hangar.toml"
RUST_LOG=hangar=warn "$HANGAR" serve --config "$WORK/hangar.toml" 2>"$WORK/serve.log" &
SERVE=$!
PIDS+=("$SERVE")
for _ in $(seq 300); do [ -s "$WORK/data/ports.json" ] && break; sleep 0.1; done
H() { "$HANGAR" --config "$WORK/hangar.toml" "$@"; }
HTTPS=$(python3 -c "import json;print(json.load(open('$WORK/data/ports.json'))['https'])")
BASE="https://127.0.0.1:$HTTPS"
CA="$WORK/data/certs/ca.pem"
api() { curl -sf --cacert "$CA" -H "Authorization: Bearer $(cat "$WORK/data/admin.token")" \
  -H 'content-type: application/json' "$BASE$1" "${@:2}"; }
rss() { awk '/VmRSS/ {print $2}' "/proc/$SERVE/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$SERVE/stat"; }

# the fleet: 10,000 imported devices (offline), 200 live ones in a one-wave campaign
python3 -c "
import json
print(json.dumps([{'id': 'GW%05d' % i, 'deviceType': 'gateway', 'protocol': 'gateway',
  'secret': 'bench-secret', 'tags': ['line-%d' % (i % 8)]} for i in range(10000)]))" > "$WORK/fleet.json"
api /api/ota/devices/import -d @"$WORK/fleet.json" >/dev/null
head -c 1000000 /dev/urandom > "$WORK/v1.bin"
head -c 4000000 /dev/urandom > "$WORK/v2.bin"
H firmware upload "$WORK/v1.bin" --version 1.0.0 >/dev/null 2>&1
H firmware release 1.0.0 >/dev/null
H firmware upload "$WORK/v2.bin" --version 1.0.1 >/dev/null 2>&1
H firmware release 1.0.1 >/dev/null
"$HANGAR" --config "$WORK/hangar.toml" sim --devices 200 --version 1.0.0 --register --slow 8 \
  --summary-every 0 > "$WORK/sim.out" 2>"$WORK/sim.err" &
PIDS+=("$!")
for _ in $(seq 600); do
  online=$(api /api/ota/statistics | python3 -c "import json,sys; print(json.load(sys.stdin)['data']['onlineDevices'])")
  [ "$online" -ge 200 ] && break; sleep 0.5
done
ID=$(api /api/ota/campaigns -d '{"name":"bench","version":"1.0.1","targets":{"all":true},"waves":[100],"maxInFlight":200}' \
  | python3 -c "import json,sys; print(json.load(sys.stdin)['data']['id'])")
for _ in $(seq 100); do
  n=$(api "/api/ota/campaigns/$ID" | python3 -c "import json,sys; c=json.load(sys.stdin)['data']['counts']; print(c.get('downloading',0))")
  [ "$n" -ge 100 ] && break; sleep 0.3
done
# a console user and a session cookie
echo "bench password" | H user add bench --role viewer >/dev/null
curl -sf --cacert "$CA" -c "$WORK/cookies" -H 'content-type: application/json' \
  -d '{"username":"bench","password":"bench password"}' "$BASE/api/auth/login" >/dev/null
page() { curl -s -o /dev/null --cacert "$CA" -b "$WORK/cookies" -w '%{http_code} %{time_total}\n' "$BASE$1"; }
ref() { curl -s -o /dev/null --cacert "$CA" -H "Authorization: Bearer $(cat "$WORK/data/admin.token")" -w '%{http_code} %{time_total}\n' "$BASE$1"; }

# the baseline: the appliance under this load, used through the JSON API as a script would
for _ in 1 2 3; do ref "/api/ota/devices?limit=10000" >/dev/null; ref "/api/ota/campaigns/$ID" >/dev/null; done
RSS0=$(rss)

declare -A T
PAGES=("/" "/?page=201" "/campaigns/$ID")
for _ in $(seq "$RUNS"); do
  for p in "${PAGES[@]}"; do
    read -r code t < <(page "$p"); [ "$code" = 200 ] || { echo "GET $p: $code" >&2; exit 1; }
    T[$p]+="$t "
  done
  read -r code t < <(ref "/api/ota/devices?limit=10000"); T[api]+="$t "
done
med() { python3 -c "import sys,statistics; v=[float(x)*1000 for x in sys.argv[1:]]; print('%.1f ms (runs: %s)' % (statistics.median(v), ', '.join('%.0f' % x for x in v)))" $1; }
echo "| page | median render time, ms (goal <= 100) |"
echo "| --- | --- |"
echo "| fleet \`/\` (10,200 devices, first page) | $(med "${T[/]}") |"
echo "| fleet \`/?page=201\` (last page) | $(med "${T[/?page=201]}") |"
echo "| campaign \`/campaigns/$ID\` (10,200 members, ~200 in flight) | $(med "${T[/campaigns/$ID]}") |"
echo "| reference: \`GET /api/ota/devices?limit=10000\` (JSON, no HTML) | $(med "${T[api]}") |"

# 20 subscribers to the event stream, interleaved with windows of none
HZ=$(getconf CLK_TCK)
NONE=() WITH=()
for r in $(seq "$ROUNDS"); do
  a=$(cpu_ticks); sleep "$WINDOW"; b=$(cpu_ticks); NONE+=("$(( b - a ))")
  SUBS=()
  for _ in $(seq 20); do
    curl -sN --cacert "$CA" -b "$WORK/cookies" "$BASE/api/events" > "$WORK/sse.$r.$RANDOM" &
    SUBS+=("$!")
  done
  sleep 1
  a=$(cpu_ticks); sleep "$WINDOW"; b=$(cpu_ticks); WITH+=("$(( b - a ))")
  [ "$r" = "$ROUNDS" ] && RSS1=$(rss)
  kill "${SUBS[@]}" 2>/dev/null || true; wait "${SUBS[@]}" 2>/dev/null || true
done
python3 - "$HZ" "$WINDOW" "${NONE[*]}" "${WITH[*]}" <<'PY'
import sys, statistics
hz, window = int(sys.argv[1]), int(sys.argv[2])
none = [int(x) / hz / window * 100 for x in sys.argv[3].split()]
with_ = [int(x) / hz / window * 100 for x in sys.argv[4].split()]
extra = [w - n for n, w in zip(none, with_)]
print()
print("| appliance CPU, % of one core | no subscriber | 20 subscribers | cost of the 20 (goal <= 5 %) |")
print("| --- | --- | --- | --- |")
print("| median | %.1f | %.1f | %.1f |" % (statistics.median(none), statistics.median(with_), statistics.median(extra)))
print("| runs | %s | %s | %s |" % (", ".join("%.1f" % x for x in none), ", ".join("%.1f" % x for x in with_), ", ".join("%.1f" % x for x in extra)))
PY
EVENTS=$(cat "$WORK"/sse.* | grep -c '^event: changes' || true)
echo
echo "RSS before the console (after the same data through the JSON API): $((RSS0 / 1024)) MB; after $((RUNS * 3)) page views and 20 event streams: $((RSS1 / 1024)) MB (+$(( (RSS1 - RSS0) / 1024 )) MB; goal <= 10 MB). $EVENTS change events reached the 20 subscribers."
