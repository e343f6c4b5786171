#!/usr/bin/env bash
# Several shapes-preset trainings side by side on one GPU, for as long as a device session allows, then each
# checkpoint on the val split: referring-expression precision@1, overall and by kind (attribute-only /
# relational), or with SWEEP_TASK=qa the QA accuracy, overall and by answer type. One process per variant: the
# default preset's step is host-bound (benchmarks/RESULTS.md, run 5), so a GPU has room for several.
#
#   SWEEP_MIN=7 SWEEP_BATCH=32 OUT=/tmp/sweep bash benchmarks/gpu/sweep.sh \
#       "base:" "decoder:--model.spatial_attention=decoder" "both:--model.spatial_attention=both"
#   # then fine-tunes from one of them (a variant's checkpoint is /tmp/sweep_runs/<NAME>/checkpoint.pth, so a
#   # fine-tune needs a name of its own: its run folder is cleared first):
#   SWEEP_TASK=qa OUT=/tmp/qa bash benchmarks/gpu/sweep.sh \
#       "slots:--preset=clevr --model.qa_readout=slots --train.load=/tmp/sweep_runs/base/checkpoint.pth" \
#       "objects:--preset=clevr --train.load=/tmp/sweep_runs/base/checkpoint.pth"
#
# Each argument is NAME:OVERRIDES (space-separated ``--preset=NAME`` and ``--section.field=value``). Writes
# $OUT/<NAME>/ (train.log, metrics.jsonl, the eval JSONs) and $OUT/sweep.md (one row per variant). Needs mdetr
# importable (PYTHONPATH=.).
set -u
out=${OUT:?set OUT}
minutes=${SWEEP_MIN:-7}
batch=${SWEEP_BATCH:-32}
device=${SWEEP_DEVICE:-cuda}
root=${SWEEP_DATA:-/tmp/sweep_shapes}
task=${SWEEP_TASK:-refexp}
case $task in refexp|qa) ;; *) echo "SWEEP_TASK must be refexp or qa, got '$task'" >&2; exit 2 ;; esac
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
    if [ "$task" = qa ]; then
        python -m mdetr.evaluate --checkpoint "/tmp/sweep_runs/$name/checkpoint.pth" --task qa --split val \
            --device "$device" --out "$out/$name/eval_qa.json" >"$out/$name/eval_qa.log" 2>&1 &
        continue
    fi
    for kind in attribute relational; do
        python -m mdetr.evaluate --checkpoint "/tmp/sweep_runs/$name/checkpoint.pth" --task refexp --device "$device" \
            --ann "$ann/shapes_refexp_val_$kind.json" --out "$out/$name/eval_$kind.json" \
            >"$out/$name/eval_$kind.log" 2>&1 &
    done
done
wait
python - "$out" "$task" "$@" <<'PY'
import json, sys
from pathlib import Path
out, task, specs = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
metric, columns = (("qa_accuracy", ("binary", "attribute", "count")) if task == "qa"
                   else ("precision@1", ("attribute-only", "relational")))
rows = [f"| variant | overrides | steps | val {metric} | {' | '.join(columns)} |",
        "|---|---|---|---|" + "---|" * len(columns)]
for spec in specs:
    name, _, overrides = spec.partition(":")
    steps, p1 = "?", "?"
    metrics = out / name / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            steps = record.get("step", steps)
            if record.get("kind") == "val":
                p1 = f"{record[metric]:.3f}"
    kinds = []
    if task == "qa":
        path = out / name / "eval_qa.json"
        per_type = json.loads(path.read_text())["per_type"] if path.exists() else {}
        kinds = [f"{per_type[t]['accuracy']:.3f}" if t in per_type else "?" for t in columns]
    for kind in ("attribute", "relational") if task == "refexp" else ():
        path = out / name / f"eval_{kind}.json"
        kinds.append(f"{json.loads(path.read_text())['metrics']['precision@1']:.3f}" if path.exists() else "?")
    if (out / name / "FAILED").exists():
        p1 = f"training {(out / name / 'FAILED').read_text().strip()}: see {name}/train.log"
    rows.append(f"| {name} | `{overrides or '(preset)'}` | {steps} | {p1} | {' | '.join(kinds)} |")
(out / "sweep.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
PY
