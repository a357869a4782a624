#!/usr/bin/env bash
# The crash harness at full size: kill -9 at ROUNDS random points (default 100) across upload,
# release, registration, task and campaign creation, campaign rounds with devices reporting,
# delta builds and backup, with every invariant checked after each restart (tests/chaos.rs). Prints "N kills tried, N survived".
# Usage: bash bench/chaos.sh [ROUNDS] [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
export HANGAR_CHAOS_ROUNDS="${1:-100}"
[ -n "${2:-}" ] && export HANGAR_CHAOS_SEED="$2"
cargo test --test chaos -- --nocapture 2>&1 | grep -E "^chaos: |^thread 'kill_9.*panicked at|round [0-9]+ \(|^test result"
