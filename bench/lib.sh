# Shared by the bench scripts: a work directory removed at exit with the processes started
# into PIDS, a free loopback port, the release build, and a Hangar config on loopback.
#   source "$(dirname "$0")/lib.sh"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
export PATH="$PATH:/usr/sbin"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
if [ -z "${HANGAR_BIN:-}" ]; then (cd "$ROOT" && cargo build --release -q); fi
HANGAR=${HANGAR_BIN:-$ROOT/target/release/hangar}

# hangar_toml DIR [MORE]: DIR/hangar.toml with its data in DIR/hangar, HTTPS and MQTT on free
# loopback ports, no plain HTTP or MQTTS; MORE is appended (more [mqtt] keys may follow).
hangar_toml() {
  cat > "$1/hangar.toml" <<CONF
data_dir = "$1/hangar"
[http]
listen = "127.0.0.1:0"
plain_listen = ""
[mqtt]
listen = "127.0.0.1:0"
tls_listen = ""
${2:-}
CONF
}

# hangar_start DIR: `hangar serve` on DIR/hangar.toml; sets HPID; returns once ports.json exists
hangar_start() {
  RUST_LOG=hangar=error "$HANGAR" serve --config "$1/hangar.toml" 2>>"$1/stderr" & HPID=$!
  PIDS+=("$HPID")
  for _ in $(seq 100); do [ -s "$1/hangar/ports.json" ] && break; sleep 0.1; done
}

# port_of DIR NAME: a port from DIR/hangar/ports.json
port_of() { python3 -c "import json;print(json.load(open('$1/hangar/ports.json'))['$2'])"; }

# h2load_run URL N [h2load args...]: "req/s MB/s succeeded" of h2load -t 2 -c 32 --h1 -n N
h2load_run() {
  local url=$1 n=$2; shift 2
  h2load -t 2 -c 32 --h1 -n "$n" "$@" "$url" 2>/dev/null | awk '
    /^finished in/ { gsub(",", ""); rps=$4; mbs=$6
                     if (mbs ~ /GB\/s$/) { sub("GB/s","",mbs); mbs*=1000 }
                     else if (mbs ~ /KB\/s$/) { sub("KB/s","",mbs); mbs/=1000 }
                     else sub("MB/s","",mbs) }
    /^requests:/ { ok=$8 }
    END { printf "%s %s %s\n", rps, mbs, ok }'
}
