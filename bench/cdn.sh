#!/usr/bin/env bash
# Hangar's firmware downloads vs nginx, side by side in one run, on loopback over TLS (HTTP/1.1).
#
#   bench/cdn.sh [ROUNDS]        (default 3 rounds; the median of each is reported)
#   PROTO=h2 bench/cdn.sh ...    HTTP/2 on both sides (nginx `listen ... ssl http2`, h2load
#                                without --h1); every round's ratios are printed too
#
# Serves the same 10 MiB file from both (nginx: 2 workers, sendfile on, tcp_nopush on, access_log
# off, self-signed P-256 certificate; Hangar: release build, its generated P-256 certificate) and
# loads each with h2load exactly as ../shared/bench/README.md describes:
#   full:   h2load -t 2 -c 32 --h1 -n 96 URL
#   ranges: h2load -t 2 -c 32 --h1 -n 20000 -H 'range: bytes=0-65535' URL
# Rounds alternate nginx / Hangar so machine noise hits both alike. Prints a markdown table with
# Hangar/nginx ratios (goal >= 1.0 for both). Installs nginx and h2load with apt-get if missing.
set -euo pipefail
ROUNDS=${1:-3}
PROTO=${PROTO:-h1}
H1=(--h1); NGX_H2=""
if [ "$PROTO" = h2 ]; then H1=(); NGX_H2=" http2"; fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx || ! need h2load; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq nginx nghttp2-client >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

# HANGAR_BIN=path measures another build (A/B runs)
if [ -z "${HANGAR_BIN:-}" ]; then (cd "$ROOT" && cargo build --release -q); fi
HANGAR=${HANGAR_BIN:-$ROOT/target/release/hangar}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
head -c $((10 * 1024 * 1024)) /dev/urandom > "$WORK/fw.bin"

# --- nginx ---------------------------------------------------------------------------------
NPORT=$(free_port)
mkdir -p "$WORK/nginx/www/firmware" "$WORK/nginx/logs"
cp "$WORK/fw.bin" "$WORK/nginx/www/firmware/gateway_v1.0.0.bin"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=localhost -keyout "$WORK/nginx/key.pem" -out "$WORK/nginx/cert.pem" 2>/dev/null
cat > "$WORK/nginx/nginx.conf" <<EOF
worker_processes 2;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/logs/error.log warn;
events { worker_connections 4096; }
http {
  sendfile on; tcp_nopush on; access_log off; keepalive_requests 100000;
  client_body_temp_path $WORK/nginx/tmp; proxy_temp_path $WORK/nginx/tmp;
  fastcgi_temp_path $WORK/nginx/tmp; uwsgi_temp_path $WORK/nginx/tmp; scgi_temp_path $WORK/nginx/tmp;
  types { application/octet-stream bin; }
  server {
    listen 127.0.0.1:$NPORT ssl$NGX_H2;
    ssl_certificate $WORK/nginx/cert.pem; ssl_certificate_key $WORK/nginx/key.pem;
    root $WORK/nginx/www;
  }
}
EOF
mkdir -p "$WORK/nginx/tmp"
chmod 755 "$WORK"; chmod -R a+rX "$WORK/nginx"   # workers run as nobody
"$NGINX" -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" -e "$WORK/nginx/logs/error.log"
PIDS+=("$(sleep 0.3; cat "$WORK/nginx/nginx.pid")")

# --- Hangar --------------------------------------------------------------------------------
cat > "$WORK/hangar.toml" <<EOF
data_dir = "$WORK/hangar"
[http]
listen = "127.0.0.1:0"
plain_listen = ""
[mqtt]
listen = "127.0.0.1:0"
tls_listen = ""
EOF
RUST_LOG=hangar=warn "$HANGAR" serve --config "$WORK/hangar.toml" &
PIDS+=($!)
for _ in $(seq 100); do [ -s "$WORK/hangar/ports.json" ] && break; sleep 0.1; done
"$HANGAR" --config "$WORK/hangar.toml" firmware upload "$WORK/fw.bin" --version 1.0.0 >/dev/null
"$HANGAR" --config "$WORK/hangar.toml" firmware release 1.0.0 >/dev/null
HPORT=$(python3 -c "import json;print(json.load(open('$WORK/hangar/ports.json'))['https'])")
TOKEN=$(cat "$WORK/hangar/admin.token")

NURL="https://127.0.0.1:$NPORT/firmware/gateway_v1.0.0.bin"
HURL="https://127.0.0.1:$HPORT/firmware/gateway_v1.0.0.bin"
# sanity: both serve the same bytes
want=$(sha256sum < "$WORK/fw.bin" | cut -d' ' -f1)
[ "$(curl -sk "$NURL" | sha256sum | cut -d' ' -f1)" = "$want" ] || { echo "nginx serves wrong bytes" >&2; exit 1; }
[ "$(curl -sk -H "authorization: Bearer $TOKEN" "$HURL" | sha256sum | cut -d' ' -f1)" = "$want" ] || { echo "hangar serves wrong bytes" >&2; exit 1; }

# h2load prints "finished in 1.23s, 78.05 req/s, 780.51MB/s"; we keep req/s and MB/s
run() { # URL N [extra h2load args...]
  local url=$1 n=$2; shift 2
  h2load -t 2 -c 32 "${H1[@]}" -n "$n" "$@" "$url" 2>/dev/null | awk '
    /^finished in/ { gsub(",", ""); rps=$4; mbs=$6
                     if (mbs ~ /GB\/s$/) { sub("GB/s","",mbs); mbs*=1000 }
                     else if (mbs ~ /KB\/s$/) { sub("KB/s","",mbs); mbs/=1000 }
                     else sub("MB/s","",mbs) }
    /^requests:/ { ok=$8 }
    END { printf "%s %s %s\n", rps, mbs, ok }'
}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

declare -A R
for i in $(seq "$ROUNDS"); do
  for who in nginx hangar; do
    if [ $who = nginx ]; then url=$NURL; auth=(); else url=$HURL; auth=(-H "authorization: Bearer $TOKEN"); fi
    read -r rps mbs ok < <(run "$url" 96 "${auth[@]}")
    [ "$ok" = 96 ] || { echo "$who: only $ok/96 full downloads succeeded" >&2; exit 1; }
    R[$who-full]+="$mbs "
    read -r rps mbs ok < <(run "$url" 20000 -H 'range: bytes=0-65535' "${auth[@]}")
    [ "$ok" = 20000 ] || { echo "$who: only $ok/20000 range requests succeeded" >&2; exit 1; }
    R[$who-range]+="$rps "
  done
done

# 1,000 concurrent full downloads: peak RSS of each server (Hangar: VmHWM of its one process;
# nginx: the sum of its workers' VmHWM). Needs 1,000+ descriptors per side.
ulimit -n 65536 2>/dev/null || true
HPID=${PIDS[1]}
run "$HURL" 1000 -H "authorization: Bearer $TOKEN" -c 1000 >/dev/null
hang_rss=$(awk '/VmHWM/ {print $2}' /proc/$HPID/status)
run "$NURL" 1000 -c 1000 >/dev/null
ngx_rss=0
for w in $(pgrep -P "${PIDS[0]}"); do ngx_rss=$((ngx_rss + $(awk '/VmHWM/ {print $2}' /proc/$w/status))); done

nf=$(tr ' ' '\n' <<<"${R[nginx-full]}" | grep . | median)
hf=$(tr ' ' '\n' <<<"${R[hangar-full]}" | grep . | median)
nr=$(tr ' ' '\n' <<<"${R[nginx-range]}" | grep . | median)
hr=$(tr ' ' '\n' <<<"${R[hangar-range]}" | grep . | median)
ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }

echo "| load (h2load -t 2 -c 32 ${H1[*]:-(HTTP/2)}, TLS, loopback, median of $ROUNDS) | nginx | Hangar | Hangar/nginx | goal |"
echo "| --- | ---: | ---: | ---: | --- |"
echo "| full 10 MiB downloads (-n 96), MB/s | $nf | $hf | $(ratio "$hf" "$nf") | >= 1.0 |"
echo "| 64 KiB ranges (-n 20000), req/s | $nr | $hr | $(ratio "$hr" "$nr") | >= 1.0 |"
echo "| 1,000 concurrent 10 MiB downloads: peak RSS, MiB | $((ngx_rss / 1024)) | $((hang_rss / 1024)) | $(ratio "$hang_rss" "$ngx_rss") | bounded (not 10 GB) |"
echo
echo "raw: nginx full [${R[nginx-full]}] hangar full [${R[hangar-full]}] nginx range [${R[nginx-range]}] hangar range [${R[hangar-range]}]"
per_round() { python3 -c "
a, b = '$1'.split(), '$2'.split()
print(', '.join(f'{float(y)/float(x):.2f}' for x, y in zip(a, b)))"; }
echo "ratios per round: full [$(per_round "${R[nginx-full]}" "${R[hangar-full]}")] ranges [$(per_round "${R[nginx-range]}" "${R[hangar-range]}")]"
