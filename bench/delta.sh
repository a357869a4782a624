#!/usr/bin/env bash
# Hangar's delta generator vs Debian's bsdiff 4.3, side by side in one run, on every pair of the
# real firmware corpus (../shared/bench/fetch-corpus.sh).
#
#   bench/delta.sh [CORPUS_DIR]     (default ${TMPDIR:-/tmp}/hangar-corpus; fetched if missing)
#
# For each pair: patch size, wall time and peak RSS of `bsdiff old new patch` and of
# `hangar delta make old new patch` (the server's code; threads = one per core), plus the time
# Debian's `bspatch` takes to apply our patch, and a byte-for-byte check of its output. Prints a
# markdown table with the ratios Hangar/Debian (goals: size <= 1.0 on every pair, time <= 0.5,
# RSS <= 1.0). Wall times are averaged over several runs (10 for images under 4 MB, else 2).
# Installs bsdiff with apt-get if missing.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CORPUS=${1:-${TMPDIR:-/tmp}/hangar-corpus}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if ! command -v bsdiff >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq bsdiff >/dev/null
fi
if ! ls "$CORPUS"/*/old.bin >/dev/null 2>&1; then
  bash "$ROOT/../shared/bench/fetch-corpus.sh" "$CORPUS" >/dev/null
fi
(cd "$ROOT" && cargo build --release -q)
HANGAR="$ROOT/target/release/hangar"

# measure OUTFILE REPS CMD...: prints "seconds maxrss_kb": peak RSS of one run (GNU time), wall
# time averaged over REPS runs (small images finish in a few ms, below time's 10 ms resolution)
measure() {
  local out=$1 reps=$2; shift 2
  /usr/bin/time -f "%M" -o "$out" "$@" >/dev/null 2>&1
  local t0 t1
  t0=$(date +%s%N)
  for _ in $(seq "$reps"); do "$@" >/dev/null 2>&1; done
  t1=$(date +%s%N)
  echo "$(awk -v a="$t0" -v b="$t1" -v r="$reps" 'BEGIN {printf "%.3f", (b-a)/1e9/r}') $(cat "$out")"
}

echo "| pair | new image | Debian bsdiff: patch / time / RSS | Hangar: patch / time / RSS | size ratio | time ratio | RSS ratio | bspatch of ours | exact |"
echo "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | --- |"
for dir in "$CORPUS"/*/; do
  p=$(basename "$dir")
  [ -f "$dir/old.bin" ] || continue
  new_size=$(stat -c %s "$dir/new.bin")
  reps=$(( new_size < 4000000 ? 10 : 2 ))
  read -r dt drss < <(measure "$WORK/t1" "$reps" bsdiff "$dir/old.bin" "$dir/new.bin" "$WORK/debian.patch")
  read -r ht hrss < <(measure "$WORK/t2" "$reps" "$HANGAR" delta make "$dir/old.bin" "$dir/new.bin" "$WORK/ours.patch")
  read -r pt _ < <(measure "$WORK/t3" "$reps" bspatch "$dir/old.bin" "$WORK/out.bin" "$WORK/ours.patch")
  ds=$(stat -c %s "$WORK/debian.patch"); hs=$(stat -c %s "$WORK/ours.patch")
  if cmp -s "$WORK/out.bin" "$dir/new.bin"; then exact=yes; else exact=NO; fi
  awk -v p="$p" -v n="$new_size" -v ds="$ds" -v dt="$dt" -v drss="$drss" -v hs="$hs" -v ht="$ht" \
      -v hrss="$hrss" -v pt="$pt" -v ex="$exact" 'BEGIN {
    printf "| %s | %.2f MB | %d B (%.1f %%) / %.3f s / %d MB | %d B (%.1f %%) / %.3f s / %d MB | %.3f | %.2f | %.2f | %.3f s | %s |\n",
      p, n/1e6, ds, 100*ds/n, dt, drss/1024, hs, 100*hs/n, ht, hrss/1024, hs/ds, (dt>0?ht/dt:0), hrss/drss, pt, ex }'
done
echo
echo "Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r); $(bsdiff 2>&1 | head -1 || true)"
