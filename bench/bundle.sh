#!/usr/bin/env bash
# Offline bundles and signatures, side by side with the stock tools, on loopback:
#  - importing a bundle of SIZE_MB (two images of half each, made by `hangar bundle create`):
#    its throughput beside `cp` of the same bundle into the data directory's filesystem followed
#    by `sha256sum` of the copy (the least a careful person does by hand), RUNS interleaved runs;
#    and the appliance's peak RSS (VmHWM) before the first import and after the last;
#  - what checking a signature adds to an upload of UPLOAD_MB: the same image uploaded with and
#    without its signature part, RUNS interleaved runs each (which goes first alternates).
# Goals: import >= 0.8x of cp + sha256sum, peak RSS <= 64 MB; a signature adds <= 5 % to an upload.
#
#   bench/bundle.sh [SIZE_MB] [RUNS] [UPLOAD_MB]     (defaults 2048, 3, 100)
#   HANGAR_BIN=path bench/bundle.sh ...             measure this hangar binary
set -euo pipefail
SIZE_MB=${1:-2048}
RUNS=${2:-3}
UPLOAD_MB=${3:-100}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/hangar-bundle-bench.XXXXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
if [ -z "${HANGAR_BIN:-}" ]; then (cd "$ROOT" && cargo build --release -q); fi
HANGAR=${HANGAR_BIN:-$ROOT/target/release/hangar}
now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

cd "$WORK"
"$HANGAR" key generate vendor --no-password >/dev/null 2>&1
half=$((SIZE_MB / 2))
head -c "$((half << 20))" /dev/urandom > a.bin
head -c "$((half << 20))" /dev/urandom > b.bin
printf 'data_dir = "%s/data"\n[http]\nlisten = "127.0.0.1:0"\nplain_listen = "127.0.0.1:0"\nmax_upload_bytes = 4294967296\n[mqtt]\nlisten = "127.0.0.1:0"\ntls_listen = ""\n[trust]\nkeys = [{name = "vendor", key = "%s"}]\n' \
  "$WORK" "$(sed -n 2p vendor.pub)" > hangar.toml
RUST_LOG=hangar=warn "$HANGAR" serve --config hangar.toml 2>serve.log &
SERVE=$!
PIDS+=("$SERVE")
for _ in $(seq 300); do [ -s data/ports.json ] && break; sleep 0.1; done
H() { "$HANGAR" --config hangar.toml "$@"; }
hwm() { awk '/VmHWM/ {print $2}' "/proc/$SERVE/status"; }
HWM0=$(hwm)

echo "bundle of ${SIZE_MB} MB (two images), $RUNS interleaved runs:"
IMPORT=()
BASE=()
RATIO=()
for r in $(seq "$RUNS"); do
  # a new bundle each run (new versions), made outside the timing
  rm -f run.bundle
  "$HANGAR" bundle create --key vendor.key --out run.bundle --sequence "$r" \
    --firmware "a.bin:gateway:$r.0.0" --firmware "b.bin:gateway:$r.0.1" >/dev/null 2>&1
  bytes=$(stat -c %s run.bundle)
  cat run.bundle > /dev/null # both sides start from the page cache
  t0=$(now); cp run.bundle data/tmp/copy.bin && sha256sum data/tmp/copy.bin >/dev/null; t1=$(now)
  rm -f data/tmp/copy.bin
  cp_mbs=$(echo "$bytes $t0 $t1" | awk '{printf "%.0f", $1/1048576/($3-$2)}')
  t0=$(now); H bundle import run.bundle >/dev/null; t1=$(now)
  im_mbs=$(echo "$bytes $t0 $t1" | awk '{printf "%.0f", $1/1048576/($3-$2)}')
  # the images are stored twice over the runs: free their blobs again for the next run
  H firmware delete "$r.0.0" >/dev/null; H firmware delete "$r.0.1" >/dev/null
  echo "  run $r: import $im_mbs MB/s, cp + sha256sum $cp_mbs MB/s, ratio $(echo "$im_mbs $cp_mbs" | awk '{printf "%.2f", $1/$2}')"
  IMPORT+=("$im_mbs"); BASE+=("$cp_mbs"); RATIO+=("$(echo "$im_mbs $cp_mbs" | awk '{printf "%.2f", $1/$2}')")
done
im=$(printf '%s\n' "${IMPORT[@]}" | median)
cp_m=$(printf '%s\n' "${BASE[@]}" | median)
HWM1=$(hwm)
echo "  median: import $im MB/s, cp + sha256sum $cp_m MB/s; median of the runs' ratios $(printf '%s\n' "${RATIO[@]}" | median) (goal >= 0.8)"
echo "  appliance peak RSS: $((HWM0 / 1024)) MB before, $((HWM1 / 1024)) MB after the imports (goal <= 64 MB)"

echo "upload of ${UPLOAD_MB} MB with and without its signature, $RUNS interleaved runs:"
head -c "$((UPLOAD_MB << 20))" /dev/urandom > up.bin
HTTP=$(python3 -c "import json;print(json.load(open('data/ports.json'))['http'])")
TOKEN=$(cat data/admin.token)
up() { # version, extra curl args...
  curl -sf -o /dev/null -w '%{time_total}\n' -H "Authorization: Bearer $TOKEN" \
    "${@:2}" -F "version=$1" -F "file=@up.bin" "http://127.0.0.1:$HTTP/api/ota/firmware/upload"
}
PLAIN=()
SIGNED=()
EXTRA=()
for r in $(seq "$RUNS"); do
  "$HANGAR" firmware sign up.bin --version "9.$r.1" --key vendor.key >/dev/null 2>&1
  # The order alternates: of two identical unsigned uploads in a row the second takes longer
  # (median +4.6 % over 30 pairs here: the file system is still busy with the first's 100 MB),
  # which a fixed order would charge to the signature.
  if [ $((r % 2)) = 1 ]; then
    p=$(up "9.$r.0")
    s=$(up "9.$r.1" -F "signature=<up.bin.minisig")
  else
    s=$(up "9.$r.1" -F "signature=<up.bin.minisig")
    p=$(up "9.$r.0")
  fi
  rm -f up.bin.minisig
  curl -sf -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$HTTP/api/ota/firmware/9.$r.1" |
    grep -q '"signatureStatus":"valid"' || { echo "the signed upload is not valid" >&2; exit 1; }
  H firmware delete "9.$r.0" >/dev/null; H firmware delete "9.$r.1" >/dev/null
  echo "  run $r: unsigned $p s, signed $s s, $(echo "$p $s" | awk '{printf "%+.1f", ($2/$1-1)*100}') %"
  PLAIN+=("$p"); SIGNED+=("$s"); EXTRA+=("$(echo "$p $s" | awk '{printf "%.1f", ($2/$1-1)*100}')")
done
p=$(printf '%s\n' "${PLAIN[@]}" | median)
s=$(printf '%s\n' "${SIGNED[@]}" | median)
echo "  median: unsigned $p s, signed $s s; median of the runs' extra time $(printf '%s\n' "${EXTRA[@]}" | median) % (goal <= 5 %)"
