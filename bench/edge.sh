#!/usr/bin/env bash
# Downloads through a download edge (config/nginx-edge.conf, run as shipped but for its EDIT
# lines: secure_link + slice + proxy_cache in front of Hangar) vs nginx serving the same file
# from a directory, side by side, ROUNDS interleaved rounds, over TLS on loopback (HTTP/1.1).
#
#   bench/edge.sh [ROUNDS]        (default 3)
#
# Same loads as bench/cdn.sh: full 10 MiB downloads (h2load -t 2 -c 32 --h1 -n 96) and 64 KiB
# ranges (-n 20000). The edge's cache is warmed by one download first (a campaign's first
# device); every request carries a link Hangar's secure_link scheme makes (md5, expires).
# Goal: edge/direct >= 1.0.
set -euo pipefail
ROUNDS=${1:-3}
source "$(dirname "$0")/lib.sh"
SECRET=bench-edge-secret-0123456789
head -c $((10 * 1024 * 1024)) /dev/urandom > "$WORK/fw.bin"
chmod 755 "$WORK"
USER_LINE=""; [ "$(id -u)" = 0 ] && USER_LINE="user root;"

# --- Hangar, with the edge's secret --------------------------------------------------------
hangar_toml "$WORK" "$(printf '[downloads]\nsecure_link_secret = "%s"' "$SECRET")"
hangar_start "$WORK"
"$HANGAR" --config "$WORK/hangar.toml" firmware upload "$WORK/fw.bin" --version 1.0.0 >/dev/null
"$HANGAR" --config "$WORK/hangar.toml" firmware release 1.0.0 >/dev/null
HPORT=$(port_of "$WORK" https)
CERTS=$WORK/hangar/certs

# --- the edge: config/nginx-edge.conf, EDIT lines pointed here --------------------------------
EPORT=$(free_port)
mkdir -p "$WORK/edge/logs" "$WORK/edge/tmp" "$WORK/edge/cache"
sed -e "s|/var/cache/nginx/hangar|$WORK/edge/cache|" \
    -e "s|hangar.local:8443|127.0.0.1:$HPORT|" \
    -e "s|listen 8443 ssl;|listen 127.0.0.1:$EPORT ssl;|" \
    -e "s|proxy_ssl_name                hangar.local;|proxy_ssl_name                localhost;|" \
    -e "s|/etc/nginx/ssl/hangar-ca.pem|$CERTS/ca.pem|" \
    -e "s|/etc/nginx/ssl/edge.pem|$CERTS/server.pem|" -e "s|/etc/nginx/ssl/edge.key|$CERTS/server.key|" \
    -e "s|SITE_SECRET|$SECRET|" "$ROOT/config/nginx-edge.conf" > "$WORK/edge/site.conf"
http_block() { # DIR: the common http settings of both nginx (as bench/cdn.sh)
  printf '%s\nworker_processes 2;\npid %s/nginx.pid;\nerror_log %s/logs/error.log warn;\nevents { worker_connections 4096; }\nhttp {\n  sendfile on; tcp_nopush on; access_log off; keepalive_requests 100000;\n  client_body_temp_path %s/tmp; proxy_temp_path %s/tmp; fastcgi_temp_path %s/tmp; uwsgi_temp_path %s/tmp; scgi_temp_path %s/tmp;\n  types { application/octet-stream bin; }\n' "$USER_LINE" "$1" "$1" "$1" "$1" "$1" "$1" "$1"
}
{ http_block "$WORK/edge"; echo "  include $WORK/edge/site.conf;"; echo "}"; } > "$WORK/edge/nginx.conf"
nginx -c "$WORK/edge/nginx.conf" -p "$WORK/edge" -e "$WORK/edge/logs/error.log"
PIDS+=("$(sleep 0.3; cat "$WORK/edge/nginx.pid")")

# --- nginx serving the file directly ----------------------------------------------------------
NPORT=$(free_port)
mkdir -p "$WORK/direct/logs" "$WORK/direct/tmp" "$WORK/direct/www/firmware"
cp "$WORK/fw.bin" "$WORK/direct/www/firmware/gateway_v1.0.0.bin"
{ http_block "$WORK/direct"; printf '  server {\n    listen 127.0.0.1:%s ssl;\n    ssl_certificate %s/server.pem; ssl_certificate_key %s/server.key;\n    root %s/direct/www;\n  }\n}\n' "$NPORT" "$CERTS" "$CERTS" "$WORK"; } > "$WORK/direct/nginx.conf"
nginx -c "$WORK/direct/nginx.conf" -p "$WORK/direct" -e "$WORK/direct/logs/error.log"
PIDS+=("$(sleep 0.3; cat "$WORK/direct/nginx.pid")")

# a link as Hangar makes them: md5 = base64url(MD5("<expires><path> <secret>"))
LINK=$(python3 - "$SECRET" <<'PY'
import base64, hashlib, sys, time
exp = int(time.time()) + 86400
path = "/firmware/gateway_v1.0.0.bin"
md5 = base64.urlsafe_b64encode(hashlib.md5(f"{exp}{path} {sys.argv[1]}".encode()).digest()).decode().rstrip("=")
print(f"{path}?md5={md5}&expires={exp}")
PY
)
EURL="https://127.0.0.1:$EPORT$LINK"
NURL="https://127.0.0.1:$NPORT/firmware/gateway_v1.0.0.bin"
want=$(sha256sum < "$WORK/fw.bin" | cut -d' ' -f1)
[ "$(curl -sk "$EURL" | sha256sum | cut -d' ' -f1)" = "$want" ] || { echo "the edge serves wrong bytes" >&2; exit 1; }
[ "$(curl -sk "$NURL" | sha256sum | cut -d' ' -f1)" = "$want" ] || { echo "nginx serves wrong bytes" >&2; exit 1; }
curl -sk -o /dev/null -D - "$EURL" | grep -i x-cache-status >&2

declare -A R
for i in $(seq "$ROUNDS"); do
  for who in direct edge; do
    url=$NURL; [ $who = edge ] && url=$EURL
    read -r _ mbs ok < <(h2load_run "$url" 96)
    [ "$ok" = 96 ] || { echo "$who: only $ok/96 full downloads" >&2; exit 1; }
    R[$who-full]+="$mbs "
    read -r rps _ ok < <(h2load_run "$url" 20000 -H 'range: bytes=0-65535')
    [ "$ok" = 20000 ] || { echo "$who: only $ok/20000 ranges" >&2; exit 1; }
    R[$who-range]+="$rps "
  done
done
python3 - "${R[direct-full]}" "${R[edge-full]}" "${R[direct-range]}" "${R[edge-range]}" "$ROUNDS" <<'PY'
import statistics, sys
df, ef, dr, er = ([float(x) for x in a.split()] for a in sys.argv[1:5])
rf = [e / d for d, e in zip(df, ef)]; rr = [e / d for d, e in zip(dr, er)]
f = lambda xs: ", ".join(f"{x:,.0f}" for x in xs)
g = lambda xs: ", ".join(f"{x:.2f}" for x in xs)
print(f"| h2load --h1 -c 32, TLS, loopback, {sys.argv[5]} rounds | nginx direct | nginx edge (cache) | edge/direct, per round | median | goal |")
print("| --- | --- | --- | --- | ---: | --- |")
print(f"| full 10 MiB downloads, MB/s | {f(df)} | {f(ef)} | {g(rf)} | {statistics.median(rf):.2f} | >= 1.0 |")
print(f"| 64 KiB ranges, req/s | {f(dr)} | {f(er)} | {g(rr)} | {statistics.median(rr):.2f} | >= 1.0 |")
PY
