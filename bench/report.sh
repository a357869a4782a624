#!/usr/bin/env bash
# The signed site report (GET /api/reports) at DEVICES registered devices: what it costs the
# appliance's memory while it is written and streamed.
#
#   bench/report.sh [DEVICES] [ROUNDS]     (default 100000 devices, 3 rounds)
#
# Registers DEVICES devices (one bulk import), lets the appliance settle, resets its peak RSS
# (/proc/PID/clear_refs), downloads the report with curl, and reads the peak back: the growth
# over the idle RSS is the export's cost. Goal: <= 64 MB over idle.
set -euo pipefail
N=${1:-100000}
ROUNDS=${2:-3}
source "$(dirname "$0")/lib.sh"
hangar_toml "$WORK"
hangar_start "$WORK"
python3 - "$N" > "$WORK/devices.json" <<'PY'
import json, sys
n = int(sys.argv[1])
print(json.dumps([{"id": f"R{i:06d}", "protocol": "gateway", "secret": f"report-secret-{i}",
                   "tags": ["hall-%d" % (i % 7)]} for i in range(n)]))
PY
"$HANGAR" --config "$WORK/hangar.toml" device import "$WORK/devices.json" >/dev/null
PORT=$(port_of "$WORK" https)
TOKEN=$(cat "$WORK/hangar/admin.token")
kb() { awk -v f="$1" '$1 == f":" {print $2}' "/proc/$HPID/status"; }
sleep 2
for r in $(seq "$ROUNDS"); do
  idle=$(kb VmRSS)
  echo 5 > "/proc/$HPID/clear_refs"
  t0=$(date +%s.%N)
  curl -sk -H "authorization: Bearer $TOKEN" -o "$WORK/report.tar" "https://127.0.0.1:$PORT/api/reports"
  t1=$(date +%s.%N)
  peak=$(kb VmHWM)
  size=$(stat -c %s "$WORK/report.tar")
  python3 -c "print(f'round $r: {$N} devices, report {$size/1e6:.1f} MB in {$t1-$t0:.2f} s; RSS idle {$idle/1024:.1f} MB, peak {$peak/1024:.1f} MB, growth {($peak-$idle)/1024:.1f} MB (goal <= 64)')"
done
