"""Turn pytest-benchmark JSON files into the markdown section of the GPU runbook: the kernel issues' targets
first (measured value, target, met or not), then every row.

Usage: python benchmarks/gpu/summarize.py BENCH_JSON... [--tests-log LOG] [--append benchmarks/RESULTS.md]

Rows are grouped by (op, shape, mode, dtype); each row gives a provider's median, its speed relative to the
group's baseline (the ``reference`` provider, or the first one recorded), TFLOP/s where the benchmark recorded
``flops``, peak memory and kernel launches where recorded.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import re
from collections import OrderedDict
from pathlib import Path
from typing import List, Optional

BASELINES = ("reference", "eager", "detr_scipy", "sdpa_bool")


def _versions() -> str:
    parts = [f"python {platform.python_version()}"]
    try:
        import torch

        parts.append(f"torch {torch.__version__}")
        if torch.cuda.is_available():
            parts.append(f"CUDA {torch.version.cuda}")
    except ImportError:
        pass
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        pass
    return ", ".join(parts)


def _row(rows: List[dict], **want) -> Optional[dict]:
    """The first benchmark whose extra_info has every ``want`` value (None when absent)."""
    return next((b for b in rows if all(b.get("extra_info", {}).get(k) == v for k, v in want.items())), None)


def _median(rows: List[dict], **want) -> Optional[float]:
    """Median seconds of that benchmark."""
    row = _row(rows, **want)
    return None if row is None else row["stats"]["median"]


def _info(rows: List[dict], key: str, **want):
    """One extra_info field of that benchmark."""
    row = _row(rows, **want)
    return None if row is None else row["extra_info"].get(key)


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return num / den if num is not None and den else None


def targets(rows: List[dict]) -> str:
    """The targets of the kernel issues, from whatever rows this run recorded ("n/a" where a row is missing)."""
    out = ["| target | measured | goal | met |", "|---|---:|---:|---|"]

    def add(name: str, value: Optional[float], goal: str, ok: Optional[bool], fmt: str = "{:.2f}x") -> None:
        shown = "n/a" if value is None else fmt.format(value)
        out.append(f"| {name} | {shown} | {goal} | {'n/a' if value is None else ('yes' if ok else 'NO')} |")

    enc = "encoder B16 Lq1000 Lk1000 pad30%"
    att = dict(op="attention", shape=enc, mode="both")
    triton = _median(rows, provider="triton", **att)
    r = _ratio(_median(rows, provider="sdpa_bool", **att), triton)
    add("attention fwd+bwd B16 L1000: SDPA bool mask / triton", r, ">= 1.5x", r is not None and r >= 1.5)
    anchors = [(p, _median(rows, provider=p, **att)) for p in
               ("sdpa_bool", "sdpa_efficient", "sdpa_cudnn", "sdpa_math", "flex", "flash_varlen", "xformers")]
    anchors = [(p, t) for p, t in anchors if t is not None]
    if anchors:
        best, best_t = min(anchors, key=lambda pt: pt[1])
        add(f"attention fwd+bwd B16 L1000: best anchor ({best}) / triton", _ratio(best_t, triton), ">= 1.0x",
            (_ratio(best_t, triton) or 0) >= 1.0)
    for n in (600, 1000, 1400):
        padded = _median(rows, op="attention", provider="triton", mode="both", shape=f"encoder B16 Lq{n} Lk{n} pad30%")
        full = _median(rows, op="attention", provider="triton", mode="both", shape=f"encoder B16 Lq{n} Lk{n} pad0%")
        r = _ratio(padded, full)
        add(f"attention B16 L{n}: time with 30% keys padded / no padding", r, "<= 0.80", r is not None and r <= 0.8,
            "{:.2f}")
    mems = [(n, _info(rows, "peak_mem_mb", op="attention", provider="triton", mode="both",
                      shape=f"encoder B16 Lq{n} Lk{n} pad30%")) for n in (600, 1400)]
    if all(m is not None for _, m in mems):
        growth = mems[1][1] / mems[0][1] if mems[0][1] else None
        add("attention B16 peak memory L1400 / L600 (linear: 2.33, quadratic: 5.4)", growth, "~2.3 (linear in L)",
            growth is not None and growth < 3.0, "{:.2f}")
    shape384 = "P=384 (B=64 x 6 layers) Q=100 T~U[1,50]"
    dense = _median(rows, op="hungarian_matcher", provider="dense", shape=shape384)
    add("matcher: 384 problems, dense (costs + solve + transfer), ms", None if dense is None else dense * 1e3,
        "<= 1 ms", dense is not None and dense <= 1e-3, "{:.3f}")
    r = _ratio(_median(rows, op="hungarian_matcher", provider="detr_scipy", shape=shape384), dense)
    add("matcher: DETR's scipy matcher / dense, 384 problems", r, ">= 25x", r is not None and r >= 25)
    r = _ratio(_median(rows, op="lsa", provider="torch_linear_assignment", shape=shape384),
               _median(rows, op="lsa", provider="ours_cuda", shape=shape384))
    add("solver: torch-linear-assignment / ours_cuda, 384 problems", r, "> 1.0x", r is not None and r > 1.0)
    for op, shape in (("contrastive", "N=6 B=32 Q=100 L=256 D=64"), ("soft_token", "N=6 B=32 Q=100 L=256 D=64")):
        fused = _median(rows, op=op, provider="triton", mode="both", shape=shape)
        r = _ratio(_median(rows, op=op, provider="eager", mode="both", shape=shape), fused)
        add(f"{op} fwd+bwd B32: eager / triton", r, ">= 3x", r is not None and r >= 3)
        r = _ratio(_median(rows, op=op, provider="compiled", mode="both", shape=shape), fused)
        add(f"{op} fwd+bwd B32: torch.compile / triton", r, ">= 1.2x", r is not None and r >= 1.2)
        launches = _info(rows, "launches", op=op, provider="triton", mode="both", shape=shape)
        add(f"{op} fwd+bwd B32: kernel launches", launches, "<= 4", launches is not None and launches <= 4, "{:d}")
    for b in sorted({i.get("shape") for i in (r.get("extra_info", {}) for r in rows) if i.get("op") == "train_step"},
                    key=str):
        for provider in ("fused", "fused_triton"):
            r = _ratio(_median(rows, op="train_step", provider="reference", shape=b),
                       _median(rows, op="train_step", provider=provider, shape=b))
            if r is not None:
                out.append(f"| MDETR train step {b}: reference / {provider} | {r:.2f}x | (no target) | |")
    return "\n".join(out)


def table(rows: List[dict]) -> str:
    groups: "OrderedDict[tuple, list]" = OrderedDict()
    for b in rows:
        info = b.get("extra_info", {})
        key = (info.get("op", b["group"] or "?"), info.get("shape", ""), info.get("mode", ""), info.get("dtype", ""))
        groups.setdefault(key, []).append((info, b["stats"]))
    lines = ["| op | shape | mode | dtype | provider | median ms | vs baseline | TFLOP/s | peak MiB | launches |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for (op, shape, mode, dtype), rows in groups.items():
        base = None
        for name in BASELINES:
            base = next((s["median"] for i, s in rows if i.get("provider") == name), None)
            if base is not None:
                break
        if base is None:
            base = rows[0][1]["median"]
        for info, stats in rows:
            med = stats["median"]
            tflops = f"{info['flops'] / med / 1e12:.1f}" if info.get("flops") else ""
            lines.append(
                f"| {op} | {shape} | {mode} | {dtype} | {info.get('provider', '?')} | {med * 1e3:.3f} | "
                f"{base / med:.2f}x | {tflops} | {info.get('peak_mem_mb', '')} | {info.get('launches', '')} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench_json", nargs="+", help="pytest-benchmark JSON files (missing ones are skipped)")
    ap.add_argument("--tests-log", help="pytest log of the GPU correctness tests; its last line is recorded")
    ap.add_argument("--append", help="markdown file to append the section to")
    ap.add_argument("--title", help="the section's title instead of '<now> UTC, <card>' (summarizing elsewhere)")
    ap.add_argument("--versions", help="the versions line instead of this interpreter's (summarizing elsewhere)")
    ap.add_argument("--note", default="", help="a paragraph under the title: what code and settings ran")
    args = ap.parse_args()
    rows: List[dict] = []
    for name in args.bench_json:
        try:
            rows += json.loads(Path(name).read_text()).get("benchmarks", [])
        except (OSError, ValueError):  # missing or cut short
            print(f"(no readable {name}: that suite did not finish)")
    card = next((b["extra_info"]["device"] for b in rows if b.get("extra_info", {}).get("device")), "unknown device")
    title = args.title or f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {card}"
    head = f"## {title}\n\n{args.versions or _versions()}\n" + (f"\n{args.note}\n" if args.note else "")
    tests = ""
    if args.tests_log and Path(args.tests_log).exists():
        last = [ln for ln in Path(args.tests_log).read_text().splitlines()
                if re.match(r"=* ?\d+ (passed|failed|error|skipped|deselected)", ln) or ln.startswith("CUT")]
        shown = " / ".join(ln.strip("= ") for ln in last[-2:]) if last else "no pytest summary line (cut short?)"
        tests = f"\nGPU correctness tests: `{shown}`\n"
    goals, every = targets(rows), table(rows)
    section = f"{head}{tests}\n### Targets\n\n{goals}\n\n### All rows\n\n{every}\n"
    print(f"{every}\n\n{head}{tests}\n{goals}")  # the targets last: a truncated log keeps its tail
    if args.append:
        path = Path(args.append)
        prev = path.read_text() if path.exists() else "# Benchmark results\n\nAppended by benchmarks/gpu/run.sh.\n"
        path.write_text(prev.rstrip("\n") + "\n\n" + section)


if __name__ == "__main__":
    main()
