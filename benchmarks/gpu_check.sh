#!/usr/bin/env bash
# The GPU check: on a machine with one CUDA GPU, from the repository root or anywhere,
#     bash benchmarks/gpu_check.sh
# runs benchmarks/gpu_check.py (one process, the 8B-shaped model built once; about 6 minutes on an H200, at most
# 8: a timeout stops it there) and prints one markdown report, also written to gpu_check.md in $OUT (when set)
# or the current directory. Copy its tables into benchmarks/RESULTS.md with the date and device.
# `bash benchmarks/gpu_check.sh --tiny` dry-runs every section on CPU with a tiny model.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
report="${OUT:-.}/gpu_check.md"
py="${PYTHON:-python}"
timeout 480 "$py" "$root/benchmarks/gpu_check.py" "$@" | tee "$report"
