#!/usr/bin/env bash
# The GPU check of docs/benchmarks.md, one command (a few minutes on one H100/H200):
#   bench/gpu_check.sh                      # writes gpu_check.md (the table of docs/benchmarks.md §0)
#   bench/gpu_check.sh --out /tmp/gpu.md    # any option of bench/gpu_check.py
#   bench/gpu_check.sh --smoke              # the tiny model on the CPU in seconds (CI)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" "$here/gpu_check.py" "$@"
