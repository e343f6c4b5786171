"""Where the time of one MDETR training step goes, per provider of benchmarks/bench_model.py (the same model, batch
and step): wall time per synchronized step (median of N), GPU busy time per step (the sum of the kernels'
durations under torch.profiler), kernel launches per step, and the top GPU kernels and host ops. A step whose
wall time is far above its GPU time is host-bound: faster kernels do not shorten it.

    PYTHONPATH=. python benchmarks/gpu/profile_step.py [--batch 4] [--steps 20]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import benchmarks.bench_model as bm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=max(bm.BATCHES))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    batch = bm._batch(bm.train_dataset(Path(tempfile.mkdtemp()), args.batch), args.batch)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bm.CUDA else [])
    for provider in bm.PROVIDERS:
        # ``mark`` synchronizes and splits the step into phases only while ``clock`` holds a start time
        phases: dict[str, list[float]] = {}
        clock: list[float] = []

        def mark(phase: str) -> None:
            if clock:
                bm.synchronize(bm.DEVICE)
                now = time.perf_counter()
                phases.setdefault(phase, []).append(now - clock[0])
                clock[0] = now

        step, _ = bm.make_train_step(provider, batch, mark)
        for _ in range(3):
            step()
        bm.synchronize(bm.DEVICE)
        walls = []
        for _ in range(args.steps):
            t = time.perf_counter()
            step()
            bm.synchronize(bm.DEVICE)
            walls.append(time.perf_counter() - t)
        # the same steps again, synchronized after each phase: where the wall time goes
        for _ in range(args.steps):
            bm.synchronize(bm.DEVICE)
            clock[:] = [time.perf_counter()]
            step()
        clock.clear()
        n_prof = 5
        with profile(activities=activities) as prof:
            for _ in range(n_prof):
                step()
            bm.synchronize(bm.DEVICE)
        events = prof.key_averages()
        kernels = [e for e in events if e.device_type.name == "CUDA"]
        gpu_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / n_prof
        launches = sum(e.count for e in kernels) / n_prof
        print(f"\n## {provider}, B={args.batch}: wall {statistics.median(walls) * 1e3:.1f} ms median "
              f"(min {min(walls) * 1e3:.1f}, {args.steps} steps); GPU busy {gpu_ms:.1f} ms/step; "
              f"{launches:.0f} kernels/step")
        print("phases, synchronized (ms median): " + ", ".join(
            f"{name} {statistics.median(ts) * 1e3:.1f}" for name, ts in phases.items()))
        if kernels:
            print("top GPU kernels (ms/step, calls/step):")
            for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:args.top]:
                print(f"  {e.self_device_time_total / 1e3 / n_prof:7.2f}  {e.count / n_prof:5.0f}  {e.key[:90]}")
        print("top host ops by self CPU time (ms/step, calls/step):")
        host = [e for e in events if e.device_type.name == "CPU"]
        for e in sorted(host, key=lambda e: -e.self_cpu_time_total)[:args.top]:
            print(f"  {e.self_cpu_time_total / 1e3 / n_prof:7.2f}  {e.count / n_prof:5.0f}  {e.key[:90]}")
        del step
        if bm.CUDA:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
