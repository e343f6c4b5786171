#!/usr/bin/env bash
# The GPU runbook: build the compiled op, run every GPU correctness test, run every benchmark, print a short
# table last and append it (card, versions) to benchmarks/RESULTS.md. Runs from a plain checkout:
#   PYTHONPATH=. bash benchmarks/gpu/run.sh            (results also land in $OUT when that is set)
# Budget: 8 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
out="${OUT:-benchmarks/gpu/out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python - <<'PY'
import time, torch
t = time.time()
from detr_kernels import _ext
print("compiled op:", _ext.status(), f"({time.time() - t:.1f}s)")
import detr_kernels
detr_kernels.report(detr_kernels.describe("cuda"), "cuda")
PY
timeout 240 python -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log"
timeout 300 python -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
    --benchmark-json "$out/bench.json" 2>&1 | tail -n 30 | tee "$out/bench.log"
python benchmarks/gpu/summarize.py "$out/bench.json" --tests-log "$out/gpu_tests.log" --append benchmarks/RESULTS.md \
    | tee "$out/summary.md"
cp benchmarks/RESULTS.md "$out/RESULTS.md"
