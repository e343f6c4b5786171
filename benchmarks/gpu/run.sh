#!/usr/bin/env bash
# The GPU runbook: build the compiled op, run every GPU correctness test, run every benchmark suite, smoke-run
# `python -m mdetr.train --fused` on the GPU, then print the kernel issues' targets last and append the whole
# section (card, versions) to benchmarks/RESULTS.md. Runs from a plain checkout with the package's requirements
# (the two weight packages included) importable:
#   PYTHONPATH=. bash benchmarks/gpu/run.sh            (results also land in $OUT when that is set)
# RUNBOOK_SUITES picks benchmark suites (default: all five, "matcher attention_b16 losses model attention_rest").
# Budget: RUNBOOK_BUDGET_S seconds (default 480) for all stages together; each stage also has its own cap, and a
# stage that hits one is cut, so the suites after it still run and the summary says which did not finish.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
out="${OUT:-benchmarks/gpu/out}"
mkdir -p "$out"
budget="${RUNBOOK_BUDGET_S:-480}"
t0=$SECONDS
# cap S: the smaller of S seconds and what is left of the budget (0 when nothing is left: the stage is skipped)
cap() { local left=$((budget - (SECONDS - t0))); local c=$(( $1 < left ? $1 : left )); echo $(( c < 0 ? 0 : c )); }
stage() { echo; echo "== $1 (t=$((SECONDS - t0)) s, cap $2 s)"; }
rm -f "$out"/bench_*.json "$out"/bench_*.log "$out"/gpu_tests.log "$out"/train.log "$out"/profile_step.log  # no stale results

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader || true
python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'CUDA', \
torch.version.cuda, 'triton', triton.__version__)"

# The compiled op builds (JIT, nvcc) in the background while the Triton tests run; the matcher's tests come last
# and wait for it (torch's extension loader holds a lock on the build folder).
( timeout 300 python - <<'PY'
import time
t = time.time()
from detr_kernels import _ext
print("compiled op (cpu, cuda, how):", _ext.status(), f"({time.time() - t:.0f} s)")
PY
) >"$out/build.log" 2>&1 &
build_pid=$!

c=$(cap 200); stage "GPU correctness tests" "$c"
if (( c > 0 )); then
    timeout "$c" python -m pytest tests/test_attention.py tests/test_contrastive.py tests/test_soft_token.py \
        tests/test_model.py tests/test_matcher.py -m gpu -q -p no:cacheprovider -rfEs 2>&1 | tee "$out/gpu_tests.log"
    status=${PIPESTATUS[0]}
    (( status == 124 )) && echo "CUT at its cap ($c s): the tests did not finish" | tee -a "$out/gpu_tests.log"
    echo "exit $status"
fi
wait "$build_pid"
cat "$out/build.log"
python -c "import detr_kernels; detr_kernels.report(detr_kernels.describe('cuda'), 'cuda')"

# Each suite in its own process and JSON (a suite cut by its cap writes none); the attention suite in two parts,
# the headline batch (B=16) first.
for name in ${RUNBOOK_SUITES:-matcher attention_b16 losses model attention_rest}; do
    case $name in
        matcher) s=60; args=(benchmarks/bench_matcher.py) ;;
        attention_b16) s=130; args=(benchmarks/bench_attention.py -k B16) ;;
        losses) s=90; args=(benchmarks/bench_losses.py) ;;
        model) s=150; args=(benchmarks/bench_model.py) ;;
        attention_rest) s=100; args=(benchmarks/bench_attention.py -k "not B16") ;;
    esac
    c=$(cap "$s"); stage "benchmarks: $name" "$c"
    (( c > 0 )) || { echo "skipped: the budget is spent"; continue; }
    timeout "$c" python -m pytest "${args[@]}" --benchmark-only -q -p no:cacheprovider \
        --benchmark-json "$out/bench_$name.json" >"$out/bench_$name.log" 2>&1
    status=$?
    (( status == 124 )) && echo "CUT at its cap ($c s): no JSON"
    echo "exit $status (t=$((SECONDS - t0)) s): $(grep -E '^=* ?[0-9]+ (passed|failed|error|skipped)' "$out/bench_$name.log" | tail -n 1)"
    grep -E "^(FAILED|ERROR)" "$out/bench_$name.log" | head -n 5
done

# Where the training step's time goes (GPU busy time against wall time, top kernels and host ops), B=4.
c=$(cap 90); stage "profile of the training step (benchmarks/gpu/profile_step.py)" "$c"
if (( c > 0 )); then
    timeout "$c" python benchmarks/gpu/profile_step.py --batch 4 --steps 20 --top 8 2>&1 \
        | grep -v -E "USDT|Loading weights|profiler_st" | tee "$out/profile_step.log"
fi

# The main command on the GPU, shortened: a small shapes world, one minute of training, then validation.
c=$(cap 120); stage "python -m mdetr.train --fused (1 minute)" "$c"
if (( c > 0 )); then
    timeout "$c" python -m mdetr.train --fused --train.device=cuda --train.precision=bf16 \
        --data.root=/tmp/runbook_shapes --data.num_train=600 --data.num_val=100 --data.num_test=10 \
        --train.output_dir=/tmp/runbook_run --train.time_limit_min=1 --train.eval_every_steps=0 \
        >"$out/train.log" 2>&1
    echo "exit $?"; grep -v -E "it/s\]|s/it\]" "$out/train.log" | tail -n 8
fi
cp /tmp/runbook_run/metrics.jsonl "$out/train_metrics.jsonl" 2>/dev/null || true

stage "summary" 0
append=()  # a dry run without a GPU (CPU smoke sets) leaves benchmarks/RESULTS.md alone
if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    append=(--append benchmarks/RESULTS.md)
else
    echo "no CUDA device: the summary goes to $out/summary.md only"
fi
python benchmarks/gpu/summarize.py "$out"/bench_{matcher,attention_b16,losses,model,attention_rest}.json \
    --tests-log "$out/gpu_tests.log" "${append[@]}" >"$out/summary.md"
cp benchmarks/RESULTS.md "$out/RESULTS.md" 2>/dev/null || true
tail -n 40 "$out/summary.md"
echo "runbook: $((SECONDS - t0)) s"
