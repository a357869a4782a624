#!/usr/bin/env bash
# Hangar's bridge ([[mqtt.bridge]]) vs mosquitto's own bridge, in the same setup, interleaved:
# a publisher (mosquitto_pub -l, QoS 1) sends MESSAGES telemetry messages to the line's broker
# (Hangar's built-in one, or a mosquitto 2 with a bridge), which bridges site/# out at QoS 1 to
# a plant mosquitto; a subscriber there (mosquitto_sub -q 1) counts them. Rate = messages / time
# from the first publish to the last arrival. Goal: Hangar >= 0.8 x mosquitto.
#
#   bench/bridge.sh [MESSAGES] [ROUNDS] [PUBLISHERS]   (default 50000 messages, 3 rounds, 10
#                                                       publishers, each MESSAGES/PUBLISHERS)
#
# Hangar writes each bridged message to its disk queue before the publisher's PUBACK (and
# removes it after the plant's); mosquitto's bridge keeps its queue in memory (persistence off,
# as Debian ships it), so the comparison is against a broker that does less.
set -euo pipefail
M=${1:-50000}
M=$(( M - M % ${3:-10} ))
ROUNDS=${2:-3}
P=${3:-10}
source "$(dirname "$0")/lib.sh"
python3 -c "
for i in range($M - $M % $P): print('{\"line\":3,\"temp\":%d.5,\"seq\":%d,\"pad\":\"%s\"}' % (20 + i % 10, i, 'x' * 40))" > "$WORK/lines"

# plant: a plain mosquitto, started fresh for each run
plant() {
  local port=$1 dir=$2
  printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nlog_dest none\n' "$port" > "$dir/plant.conf"
  mosquitto -c "$dir/plant.conf" >/dev/null 2>&1 & echo $!
}

# measure LINEPORT PLANTPORT: seconds from the first publish to the last arrival
measure() {
  local line=$1 plantp=$2 dir=$3
  mosquitto_sub -h 127.0.0.1 -p "$plantp" -q 1 -t 'site/#' -C "$M" -W 300 > "$dir/got" & local sub=$!
  sleep 0.5
  local t0; t0=$(date +%s.%N)
  local pubs=()
  for k in $(seq 0 $((P - 1))); do
    awk -v k="$k" -v p="$P" 'NR % p == k' "$WORK/lines" | \
      mosquitto_pub -h 127.0.0.1 -p "$line" -q 1 -t "site/line3/dev$k" -l -i "dev$k" & pubs+=($!)
  done
  wait "${pubs[@]}"
  local tp; tp=$(date +%s.%N)
  wait "$sub"
  local t1; t1=$(date +%s.%N)
  local got; got=$(wc -l < "$dir/got")
  [ "$got" = "$M" ] || echo "warning: $got of $M arrived" >&2
  python3 -c "import sys; print(f'publisher done after {($tp - $t0):.3f}s', file=sys.stderr); print(f'{($t1 - $t0):.3f}')"
}

run_mosquitto() {
  local dir="$WORK/m$1"; mkdir -p "$dir"
  local pp lp; pp=$(free_port); lp=$(free_port)
  local ppid; ppid=$(plant "$pp" "$dir"); PIDS+=("$ppid")
  printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nlog_dest none\nconnection plant\naddress 127.0.0.1:%s\ntopic site/# out 1\ncleansession false\n' "$lp" "$pp" > "$dir/line.conf"
  mosquitto -c "$dir/line.conf" & local lpid=$!; PIDS+=($lpid)
  sleep 1
  measure "$lp" "$pp" "$dir"
  kill "$lpid" "$ppid"; wait "$lpid" "$ppid" 2>/dev/null || true
}

run_hangar() {
  local dir="$WORK/h$1"; mkdir -p "$dir"
  local pp; pp=$(free_port)
  local ppid; ppid=$(plant "$pp" "$dir"); PIDS+=("$ppid")
  echo "topic readwrite #" > "$dir/acl"
  hangar_toml "$dir" "$(printf 'allow_anonymous = true\nacl_file = "%s/acl"\n[[mqtt.bridge]]\nname = "plant"\nurl = "mqtt://127.0.0.1:%s"\ntopics = [ { pattern = "site/#", direction = "out", qos = 1 } ]' "$dir" "$pp")"
  hangar_start "$dir" >&2
  sleep 1
  measure "$(port_of "$dir" mqtt)" "$pp" "$dir"
  kill "$HPID" "$ppid"; wait "$HPID" "$ppid" 2>/dev/null || true
}

MS=(); HS=()
for r in $(seq "$ROUNDS"); do
  m=$(run_mosquitto "$r"); h=$(run_hangar "$r")
  echo "round $r: mosquitto bridge ${m}s, Hangar bridge ${h}s" >&2
  MS+=("$m"); HS+=("$h")
done
python3 - "$M" "${MS[*]}" "${HS[*]}" "$P" <<'PY'
import statistics, sys
m = int(sys.argv[1]); ms = [float(x) for x in sys.argv[2].split()]; hs = [float(x) for x in sys.argv[3].split()]
mr = [m / x for x in ms]; hr = [m / x for x in hs]; ratio = [h / q for h, q in zip(hr, mr)]
f = lambda xs: ", ".join(f"{x:,.0f}" for x in xs)
print(f"| {m:,} messages from {sys.argv[4]} publishers, QoS 1, site/# out | mosquitto bridge | Hangar bridge | Hangar/mosquitto, per round | median | goal |")
print("| --- | --- | --- | --- | ---: | --- |")
print(f"| messages/s | {f(mr)} | {f(hr)} | {', '.join(f'{x:.2f}' for x in ratio)} | {statistics.median(ratio):.2f} | >= 0.8 |")
PY
