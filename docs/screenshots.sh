#!/usr/bin/env bash
# Remakes the README's pictures of the web console: the browser test saves the fleet and
# campaign pages it reaches (headless Chromium; apt-get install chromium chromium-driver).
set -euo pipefail
cd "$(dirname "$0")/.."
HANGAR_SCREENSHOTS="$PWD/docs/screenshots" cargo test --test console
ls -l docs/screenshots
