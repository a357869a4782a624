#!/usr/bin/env bash
# The site broker's general traffic, Hangar vs mosquitto 2, side by side, interleaved runs, with
# the same load generator (bench/sitebroker.rs: rumqttc, TCP_NODELAY).
#
#   bench/sitebroker.sh [CLIENTS] [RUNS]      (default 10000 clients, 5 runs of each)
#   SECS=20 WARMUP=5 bench/sitebroker.sh ...  measurement window and warm-up of the telemetry run
#   HANGAR_BIN=path bench/sitebroker.sh ...   measure this hangar binary
#
# telemetry: CLIENTS devices each publish one message a second at QoS 1 on site/{id}/telemetry
#   (spread over the second); one application subscribed to site/+/telemetry at QoS 1. Figures:
#   delivered messages/s, latency p50/p99 (publish to receipt), server RSS.
#   Hangar: the devices are registered and log in with their secrets; the application is an
#   MQTT user; an acl_file gives each device `pattern write site/%u/telemetry` and the
#   application `topic read site/+/telemetry` (what a site would configure).
#   mosquitto: anonymous, no ACL (the cheapest it can be).
# fanout: CLIENTS subscribers of fan/topic; one retained publish reaches them all (time); then
#   CLIENTS newcomers subscribe and each gets the retained message (time).
# mosquitto: listener on 127.0.0.1, allow_anonymous, max_connections -1, persistence false,
#   its default queue and in-flight limits (1000, 20), log_dest none.
# Prints each run's JSON lines, then a markdown table of medians and ratios Hangar/mosquitto.
set -euo pipefail
N=${1:-10000}
RUNS=${2:-5}
SECS=${SECS:-20}
WARMUP=${WARMUP:-5}
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
FDS=$(ulimit -n)
# the load generator and the broker share this machine's descriptors: 2 per client, plus slack
MAXN=$(( (FDS - 400) / 2 ))
if [ "$N" -gt "$MAXN" ]; then
  echo "note: the open-file limit here is $FDS: using $MAXN clients, not $N" >&2
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
(cd "$ROOT" && cargo build --release -q --bench sitebroker)
HANGAR=${HANGAR_BIN:-$ROOT/target/release/hangar}
LOAD=$(ls -t "$ROOT"/target/release/deps/sitebroker-* | grep -v '\.d$' | head -1)
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.05; done; echo "nothing listens on $1" >&2; exit 1; }

mosquitto_run() { # scenario
  local port; port=$(free_port)
  printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_connections -1\npersistence false\nlog_dest none\n' "$port" > "$WORK/mosquitto.conf"
  "$MOSQ" -c "$WORK/mosquitto.conf" & local pid=$!; PIDS+=("$pid")
  wait_port "$port"
  "$LOAD" --scenario "$1" --port "$port" --clients "$N" --secs "$SECS" --warmup "$WARMUP" --server-pid "$pid"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

hangar_run() { # scenario
  rm -rf "$WORK/hangar"; mkdir -p "$WORK/hangar"
  printf 'pattern write site/%%u/telemetry\nuser app\ntopic read site/+/telemetry\ntopic readwrite fan/#\n' > "$WORK/acl"
  cat > "$WORK/hangar.toml" <<CONF
data_dir = "$WORK/hangar/data"
[http]
listen = "127.0.0.1:0"
plain_listen = ""
[mqtt]
listen = "127.0.0.1:0"
tls_listen = ""
max_connections = $((2 * N + 100))
acl_file = "$WORK/acl"
CONF
  RUST_LOG=hangar=warn "$HANGAR" serve --config "$WORK/hangar.toml" 2>>"$WORK/hangar.log" & local pid=$!; PIDS+=("$pid")
  for _ in $(seq 200); do [ -s "$WORK/hangar/data/ports.json" ] && break; sleep 0.05; done
  local port; port=$(python3 -c "import json;print(json.load(open('$WORK/hangar/data/ports.json'))['mqtt'])")
  echo "app-password" > "$WORK/pw"
  "$HANGAR" --config "$WORK/hangar.toml" mqtt-user add app --password-file "$WORK/pw" >/dev/null
  local extra=(--app-user app --app-password app-password)
  if [ "$1" = telemetry ]; then
    python3 - "$N" > "$WORK/devices.json" <<'PY'
import json, sys
n = int(sys.argv[1])
print(json.dumps([{"id": f"B{i:05d}", "protocol": "gateway", "secret": f"bench-secret-{i}"} for i in range(n)]))
PY
    "$HANGAR" --config "$WORK/hangar.toml" device import "$WORK/devices.json" >/dev/null
    extra+=(--device-password bench-secret)
  fi
  "$LOAD" --scenario "$1" --port "$port" --clients "$N" --secs "$SECS" --warmup "$WARMUP" --server-pid "$pid" "${extra[@]}"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

: > "$WORK/results"
for r in $(seq "$RUNS"); do
  for s in telemetry fanout; do
    echo "{\"run\":$r,\"broker\":\"mosquitto\",\"result\":$(mosquitto_run "$s")}" | tee -a "$WORK/results"
    echo "{\"run\":$r,\"broker\":\"hangar\",\"result\":$(hangar_run "$s")}" | tee -a "$WORK/results"
  done
done

python3 - "$WORK/results" "$N" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
n = sys.argv[2]
def med(broker, scen, key):
    v = [r["result"][key] for r in rows if r["broker"] == broker and r["result"]["scenario"] == scen]
    v = [x for x in v if x == x]  # drop NaN
    return statistics.median(v) if v else float("nan"), v
def line(label, scen, key, goal, scale=1.0, fmt="{:.2f}"):
    m, mv = med("mosquitto", scen, key); h, hv = med("hangar", scen, key)
    f = lambda x: fmt.format(x * scale)
    ratio = h / m if m else float("nan")
    print(f"| {label} | {f(m)} | {f(h)} | {ratio:.2f} | {goal} | {', '.join(f(x) for x in mv)} / {', '.join(f(x) for x in hv)} |")
print(f"| {n} clients, loopback, medians | mosquitto 2 | Hangar | Hangar/mosquitto | goal | every run (mosquitto / Hangar) |")
print("| --- | ---: | ---: | ---: | --- | --- |")
line("telemetry delivered, messages/s", "telemetry", "delivered_per_s", ">= 1.0", fmt="{:.0f}")
line("telemetry latency p50, ms", "telemetry", "latency_ms_p50", "-")
line("telemetry latency p99, ms", "telemetry", "latency_ms_p99", "<= 1.5")
line("server RSS with the fleet publishing, MB", "telemetry", "server_rss_kb", "<= 2.0", scale=1/1024, fmt="{:.1f}")
line("retained publish to every subscriber, s", "fanout", "fanout_s", "<= 1.5", fmt="{:.3f}")
line("retained message to every newcomer, s", "fanout", "retained_to_newcomers_s", "-", fmt="{:.3f}")
line("server RSS with the subscribers, MB", "fanout", "server_rss_subscribed_kb", "-", scale=1/1024, fmt="{:.1f}")
PY
