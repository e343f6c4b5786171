"""Turn a pytest-benchmark JSON file into the short markdown table of the GPU runbook.

Usage: python benchmarks/gpu/summarize.py BENCH_JSON [--tests-log LOG] [--append benchmarks/RESULTS.md]

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


def table(bench_json: dict) -> str:
    groups: "OrderedDict[tuple, list]" = OrderedDict()
    for b in bench_json.get("benchmarks", []):
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
    ap.add_argument("bench_json")
    ap.add_argument("--tests-log", help="pytest log of the GPU correctness tests; its last line is recorded")
    ap.add_argument("--append", help="markdown file to append the section to")
    args = ap.parse_args()
    data = json.loads(Path(args.bench_json).read_text())
    card = "unknown device"
    for b in data.get("benchmarks", []):
        card = b.get("extra_info", {}).get("device", card)
        break
    head = f"## {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {card}\n\n{_versions()}\n"
    tests = ""
    if args.tests_log and Path(args.tests_log).exists():
        last = [ln for ln in Path(args.tests_log).read_text().splitlines() if re.search(r"passed|failed|error", ln)]
        tests = f"\nGPU correctness tests: `{last[-1].strip('= ') if last else 'no result line'}`\n"
    section = f"{head}{tests}\n{table(data)}\n"
    print(section)
    if args.append:
        path = Path(args.append)
        prev = path.read_text() if path.exists() else "# Benchmark results\n\nAppended by benchmarks/gpu/run.sh.\n"
        path.write_text(prev.rstrip("\n") + "\n\n" + section)


if __name__ == "__main__":
    main()
