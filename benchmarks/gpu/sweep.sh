#!/usr/bin/env bash
# Several shapes-preset trainings side by side on one GPU, for as long as a device session allows, then each
# checkpoint's referring-expression precision@1 on the val split, overall and by kind (attribute-only /
# relational). One process per variant: the default preset's step is host-bound (benchmarks/RESULTS.md, run 5), so
# a GPU has room for several.
#
#   SWEEP_MIN=7 SWEEP_BATCH=32 OUT=/tmp/sweep bash benchmarks/gpu/sweep.sh \
#       "base:" "decoder:--model.spatial_attention=decoder" "both:--model.spatial_attention=both"
#
# Each argument is NAME:OVERRIDES (space-separated ``--section.field=value``). Writes $OUT/<NAME>/ (train.log,
# metrics.jsonl, the eval JSONs) and $OUT/sweep.md (one row per variant). Needs mdetr importable (PYTHONPATH=.).
set -u
out=${OUT:?set OUT}
minutes=${SWEEP_MIN:-7}
batch=${SWEEP_BATCH:-32}
device=${SWEEP_DEVICE:-cuda}
root=${SWEEP_DATA:-/tmp/sweep_shapes}
mkdir -p "$out"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}  # several processes share the host's cores
python - "$root" <<'PY' || exit 1
import sys
from mdetr.config import resolve
from mdetr.data import _ensure_from_config
print("shapes world at", _ensure_from_config(resolve("shapes", overrides=[f"data.root={sys.argv[1]}"]).data))
PY
ann="$root/annotations"
pids=()
for spec in "$@"; do
    name=${spec%%:*}; overrides=${spec#*:}
    rm -rf "/tmp/sweep_runs/$name" "$out/$name"  # never report an earlier sweep's checkpoint under this name
    mkdir -p "$out/$name"
    # shellcheck disable=SC2086  # the overrides are meant to split
    python -m mdetr.train --fused --train.device="$device" --data.batch_size="$batch" --data.root="$root" \
        --train.output_dir="/tmp/sweep_runs/$name" --train.time_limit_min="$minutes" --train.eval_every_steps=300 \
        $overrides >"$out/$name/train.log" 2>&1 &
    pids+=($!)
done
i=0
for spec in "$@"; do  # a variant whose training failed gets no evaluation: its row says so
    wait "${pids[$i]}" || echo "failed (exit $?)" >"$out/${spec%%:*}/FAILED"
    i=$((i + 1))
done
for spec in "$@"; do
    name=${spec%%:*}
    cp "/tmp/sweep_runs/$name/metrics.jsonl" "$out/$name/" 2>/dev/null
    [ -e "$out/$name/FAILED" ] && continue
    for kind in attribute relational; do
        python -m mdetr.evaluate --checkpoint "/tmp/sweep_runs/$name/checkpoint.pth" --task refexp --device "$device" \
            --ann "$ann/shapes_refexp_val_$kind.json" --out "$out/$name/eval_$kind.json" \
            >"$out/$name/eval_$kind.log" 2>&1 &
    done
done
wait
python - "$out" "$@" <<'PY'
import json, sys
from pathlib import Path
out, specs = Path(sys.argv[1]), sys.argv[2:]
rows = ["| variant | overrides | steps | val precision@1 | attribute-only | relational |", "|---|---|---|---|---|---|"]
for spec in specs:
    name, _, overrides = spec.partition(":")
    steps, p1 = "?", "?"
    metrics = out / name / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            steps = record.get("step", steps)
            if record.get("kind") == "val":
                p1 = f"{record['precision@1']:.3f}"
    kinds = []
    for kind in ("attribute", "relational"):
        path = out / name / f"eval_{kind}.json"
        kinds.append(f"{json.loads(path.read_text())['metrics']['precision@1']:.3f}" if path.exists() else "?")
    if (out / name / "FAILED").exists():
        p1 = f"training {(out / name / 'FAILED').read_text().strip()}: see {name}/train.log"
    rows.append(f"| {name} | `{overrides or '(preset)'}` | {steps} | {p1} | {kinds[0]} | {kinds[1]} |")
(out / "sweep.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
PY
