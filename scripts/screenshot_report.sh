#!/usr/bin/env bash
# Screenshot an HTML report in headless Chromium (Debian: apt-get install -y chromium).
#   scripts/screenshot_report.sh report.html [shot.png] [WIDTH,HEIGHT]
set -euo pipefail
if [[ $# -lt 1 ]]; then echo "usage: $0 REPORT.html [OUT.png] [WIDTH,HEIGHT]" >&2; exit 2; fi
report=$(realpath "$1")
out=$(realpath -m "${2:-${1%.html}.png}")
size=${3:-1400,2400}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [[ -z "$browser" ]]; then echo "no chromium found: apt-get install -y chromium" >&2; exit 1; fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --disable-sync --disable-background-networking --disable-component-update \
  --no-first-run --user-data-dir="$profile" --hide-scrollbars --window-size="$size" \
  --screenshot="$out" "file://$report" 2>/dev/null
[[ -s "$out" ]] || { echo "no screenshot written to $out" >&2; exit 1; }
echo "$out"
